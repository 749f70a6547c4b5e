//! Test tokens: HS256/384/512 JWTs signed with jsonwebtoken, and tokens
//! assembled by hand where a test needs a deliberately malformed one
//! (`alg: none`, a header that lies about its algorithm).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::now_secs;

/// HS256 secret every default relay is started with.
pub const SECRET: &str = "integration-test-secret-0123456789abcdef";

/// Standard test claims: `{"exp": now+ttl, "sub": "test", "subjects": [...]}`.
pub fn claims(subjects: &[&str], ttl_secs: i64) -> Value {
    json!({ "exp": now_secs() + ttl_secs, "sub": "test", "subjects": subjects })
}

/// HS256 token signed with `secret`.
pub fn token(secret: &str, subjects: &[&str], ttl_secs: i64) -> String {
    sign(secret, Algorithm::HS256, &claims(subjects, ttl_secs))
}

/// HS256 token over arbitrary claims, signed with [`SECRET`].
pub fn token_with_claims(claims: Value) -> String {
    sign(SECRET, Algorithm::HS256, &claims)
}

/// Token over `claims` signed with an HMAC `alg` (HS256/384/512).
pub fn sign(secret: &str, alg: Algorithm, claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode jwt")
}

/// Unpadded base64url, the encoding of each part of a JWT.
pub fn b64url(data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

/// A token assembled by hand from a raw header JSON, claims and signature
/// bytes (e.g. `{"alg":"none"}` with an empty signature), which no JWT
/// library would sign.
pub fn raw_token(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes()),
        b64url(signature)
    )
}

/// The `Authorization` header value for `token`.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// An HS256 token over a raw header JSON (e.g. one with a `crit` member no
/// JWT library would write), signed correctly with `secret`.
pub fn sign_with_header(secret: &str, header: &Value, claims: &Value) -> String {
    let signing_input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let signature = jsonwebtoken::crypto::sign(
        signing_input.as_bytes(),
        &EncodingKey::from_secret(secret.as_bytes()),
        Algorithm::HS256,
    )
    .expect("sign");
    format!("{signing_input}.{signature}")
}
