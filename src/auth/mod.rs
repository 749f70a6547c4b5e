//! JWT verification: a token in, [`Claims`] or an [`AuthError`] out.
//!
//! Only the algorithms of the configured key's family are accepted (`none`
//! never is), `exp` is required, and `aud`/`iss` are enforced when configured.
//! Library error text is never shown to clients: every failure maps to one of
//! a few fixed sentences.

mod jwks;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use jwks::Jwks;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// What a token grants.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Who the token was issued to: logs and the per-token stream limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// NATS subject patterns this token may read.
    #[serde(default)]
    pub subjects: Vec<String>,
    /// NATS subject patterns this token may publish to (`POST /publish/`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<String>,
}

/// Why a token was refused (401).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "no token: send Authorization: Bearer <jwt>, a token query parameter or a relay_token cookie"
    )]
    Missing,
    #[error(
        "tokens in the URL are turned off on this relay: send Authorization: Bearer <jwt> or a relay_token cookie"
    )]
    QueryTokenOff,
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("the token has expired")]
    Expired,
    #[error("the token's signature or algorithm is not accepted")]
    BadSignature,
    #[error("the token's claims are not accepted (exp, nbf, aud, iss, or a critical header)")]
    BadClaims,
    #[error("the token's key (kid) is not one of the relay's keys")]
    UnknownKey,
}

/// The key material a relay verifies tokens with.
#[derive(Clone)]
pub enum KeySource {
    /// HS256/384/512 shared secret.
    Secret(Vec<u8>),
    /// PEM contents of an RSA, EC or Ed25519 public key.
    PublicKeyPem(Vec<u8>),
    /// Keys fetched from a JWKS URL, shared by every shard.
    Jwks(Arc<Jwks>),
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::Secret(_) => f.write_str("Secret([redacted])"),
            KeySource::PublicKeyPem(_) => f.write_str("PublicKeyPem(..)"),
            KeySource::Jwks(j) => write!(f, "{j:?}"),
        }
    }
}

/// Verifies tokens with one key, or with the keys of a JWKS.
#[derive(Clone)]
pub struct Verifier {
    keys: Keys,
    validation: Validation,
    leeway: Duration,
}

#[derive(Clone)]
enum Keys {
    One(DecodingKey),
    Set(Arc<Jwks>),
}

impl Verifier {
    pub fn new(
        source: &KeySource,
        audience: Option<&str>,
        issuer: Option<&str>,
        leeway: Duration,
    ) -> Result<Self, String> {
        let (keys, family) = match source {
            KeySource::Secret(s) => {
                if s.is_empty() {
                    return Err("the JWT secret is empty".into());
                }
                (
                    Keys::One(DecodingKey::from_secret(s)),
                    Some(jsonwebtoken::AlgorithmFamily::Hmac),
                )
            }
            KeySource::PublicKeyPem(pem) => {
                use jsonwebtoken::AlgorithmFamily::{Ec, Ed, Rsa};
                if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
                    (Keys::One(k), Some(Rsa))
                } else if let Ok(k) = DecodingKey::from_ec_pem(pem) {
                    (Keys::One(k), Some(Ec))
                } else if let Ok(k) = DecodingKey::from_ed_pem(pem) {
                    (Keys::One(k), Some(Ed))
                } else {
                    return Err(
                        "the JWT public key is not a PEM RSA, EC (P-256/P-384) or Ed25519 public key"
                            .into(),
                    );
                }
            }
            // Each key brings its own algorithms (see `verify`).
            KeySource::Jwks(set) => (Keys::Set(set.clone()), None),
        };
        let mut validation = match family {
            Some(family) => Validation::new_for_family(family),
            None => Validation::default(),
        };
        validation.leeway = leeway.as_secs();
        validation.set_required_spec_claims(&["exp"]);
        // A token not valid yet is refused like an expired one.
        validation.validate_nbf = true;
        match audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = issuer {
            validation.set_issuer(&[iss]);
        }
        Ok(Verifier {
            keys,
            validation,
            leeway,
        })
    }

    /// Verifies `token` and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > MAX_TOKEN {
            return Err(AuthError::Malformed);
        }
        reject_critical_extensions(token)?;
        match &self.keys {
            Keys::One(key) => decode(token, key, &self.validation),
            Keys::Set(set) => {
                let header =
                    jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
                let kid = header.kid.ok_or(AuthError::BadSignature)?;
                let found = set.key(&kid).ok_or(AuthError::UnknownKey)?;
                if !found.algorithms.contains(&header.alg) {
                    return Err(AuthError::BadSignature);
                }
                let mut validation = self.validation.clone();
                validation.algorithms = vec![header.alg];
                decode(token, &found.key, &validation)
            }
        }
    }

    /// The JWKS behind this verifier, if its keys come from a URL.
    pub(crate) fn jwks(&self) -> Option<&Arc<Jwks>> {
        match &self.keys {
            Keys::Set(set) => Some(set),
            Keys::One(_) => None,
        }
    }

    /// The instant at which a token with `exp` stops being accepted: `exp`
    /// plus the leeway, the same moment a new connection would get 401.
    /// Saturates: an `exp` centuries away cannot overflow the clock.
    pub fn deadline(&self, exp: u64) -> SystemTime {
        let far = UNIX_EPOCH + Duration::from_secs(FAR_FUTURE_SECS);
        UNIX_EPOCH
            .checked_add(Duration::from_secs(exp))
            .and_then(|t| t.checked_add(self.leeway))
            .map_or(far, |t| t.min(far))
    }
}

/// Verifies the signature and claims; library errors become one of a few
/// fixed reasons (their text is never shown to clients).
fn decode(token: &str, key: &DecodingKey, validation: &Validation) -> Result<Claims, AuthError> {
    jsonwebtoken::decode::<Claims>(token, key, validation)
        .map(|d| d.claims)
        .map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::InvalidSignature
            | ErrorKind::InvalidAlgorithm
            | ErrorKind::InvalidAlgorithmName
            | ErrorKind::MissingAlgorithm
            | ErrorKind::UnsupportedAlgorithm
            | ErrorKind::InvalidEcdsaKey
            | ErrorKind::InvalidEddsaKey
            | ErrorKind::InvalidRsaKey(_)
            | ErrorKind::InvalidKeyFormat => AuthError::BadSignature,
            ErrorKind::MissingRequiredClaim(_)
            | ErrorKind::InvalidClaimFormat(_)
            | ErrorKind::InvalidIssuer
            | ErrorKind::InvalidAudience
            | ErrorKind::InvalidSubject
            | ErrorKind::ImmatureSignature => AuthError::BadClaims,
            _ => AuthError::Malformed,
        })
}

/// Largest token accepted; a JWT with a few dozen subjects is well under.
const MAX_TOKEN: usize = 16 * 1024;

/// Deadlines are capped at the year ~2500: far enough to never matter,
/// near enough for every clock type to represent.
const FAR_FUTURE_SECS: u64 = 16_725_225_600;

/// RFC 7515 §4.1.11: a JWS whose `crit` header names extensions the
/// recipient does not understand must be rejected. This relay understands
/// none, so any `crit` is refused.
fn reject_critical_extensions(token: &str) -> Result<(), AuthError> {
    use base64::Engine;
    let header = token.split('.').next().unwrap_or_default();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| AuthError::Malformed)?;
    let header: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed)?;
    if header.get("crit").is_some() {
        return Err(AuthError::BadClaims);
    }
    Ok(())
}

/// Signs an HS256 development token that may read `subjects`.
pub fn sign_hs256(
    secret: &[u8],
    subjects: Vec<String>,
    ttl: Duration,
    sub: Option<String>,
) -> Result<String, jsonwebtoken::errors::Error> {
    sign_hs256_grants(secret, subjects, Vec::new(), ttl, sub)
}

/// Signs an HS256 development token (`sse-relay token`) that may read
/// `subjects` and publish to `publish`.
pub fn sign_hs256_grants(
    secret: &[u8],
    subjects: Vec<String>,
    publish: Vec<String>,
    ttl: Duration,
    sub: Option<String>,
) -> Result<String, jsonwebtoken::errors::Error> {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_add(ttl)
        .as_secs();
    let claims = Claims {
        exp,
        sub,
        subjects,
        publish,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier() -> Verifier {
        Verifier::new(
            &KeySource::Secret(b"s3cret".to_vec()),
            None,
            None,
            Duration::from_secs(0),
        )
        .unwrap()
    }

    #[test]
    fn round_trips_a_signed_token() {
        let t = sign_hs256(
            b"s3cret",
            vec!["events.>".into()],
            Duration::from_secs(60),
            Some("me".into()),
        )
        .unwrap();
        let c = verifier().verify(&t).unwrap();
        assert_eq!(c.subjects, vec!["events.>".to_string()]);
        assert_eq!(c.sub.as_deref(), Some("me"));
    }

    #[test]
    fn classifies_failures() {
        let v = verifier();
        assert_eq!(v.verify("").unwrap_err(), AuthError::Missing);
        assert_eq!(v.verify("abc").unwrap_err(), AuthError::Malformed);
        let other = sign_hs256(b"other", vec![], Duration::from_secs(60), None).unwrap();
        assert_eq!(v.verify(&other).unwrap_err(), AuthError::BadSignature);
        let claims = serde_json::json!({"exp": 1, "subjects": []});
        let old = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"s3cret"),
        )
        .unwrap();
        assert_eq!(v.verify(&old).unwrap_err(), AuthError::Expired);
        // alg "none": header {"alg":"none","typ":"JWT"}
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJleHAiOjQxMDI0NDQ4MDB9.";
        assert!(matches!(
            v.verify(none).unwrap_err(),
            AuthError::BadSignature | AuthError::Malformed
        ));
    }

    fn hs256(header: serde_json::Value, claims: serde_json::Value) -> String {
        use base64::Engine;
        let b64 = |v: &serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let signing_input = format!("{}.{}", b64(&header), b64(&claims));
        let sig = jsonwebtoken::crypto::sign(
            signing_input.as_bytes(),
            &EncodingKey::from_secret(b"s3cret"),
            Algorithm::HS256,
        )
        .unwrap();
        format!("{signing_input}.{sig}")
    }

    fn in_an_hour() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600
    }

    #[test]
    fn a_token_not_valid_yet_is_refused() {
        let claims =
            serde_json::json!({"exp": in_an_hour(), "nbf": in_an_hour() - 60, "subjects": []});
        let t = hs256(serde_json::json!({"alg": "HS256", "typ": "JWT"}), claims);
        assert_eq!(verifier().verify(&t).unwrap_err(), AuthError::BadClaims);
    }

    #[test]
    fn a_critical_header_extension_is_refused() {
        let claims = serde_json::json!({"exp": in_an_hour(), "subjects": []});
        let plain = hs256(serde_json::json!({"alg": "HS256"}), claims.clone());
        assert!(
            verifier().verify(&plain).is_ok(),
            "the same token without crit passes"
        );
        let crit = hs256(
            serde_json::json!({"alg": "HS256", "crit": ["exp-ext"], "exp-ext": 1}),
            claims,
        );
        assert_eq!(verifier().verify(&crit).unwrap_err(), AuthError::BadClaims);
    }

    #[test]
    fn a_far_exp_saturates_instead_of_overflowing() {
        let v = verifier();
        let d = v.deadline(u64::MAX);
        assert!(d > SystemTime::now() + Duration::from_secs(100 * 365 * 86400));
        assert_eq!(d, v.deadline(u64::MAX - 1), "capped");
        let claims = serde_json::json!({"exp": u64::MAX, "subjects": []});
        let t = hs256(serde_json::json!({"alg": "HS256"}), claims);
        assert_eq!(v.verify(&t).unwrap().exp, u64::MAX);
    }

    #[test]
    fn oversized_and_garbage_tokens_are_malformed() {
        let v = verifier();
        assert_eq!(
            v.verify(&"a".repeat(MAX_TOKEN + 1)).unwrap_err(),
            AuthError::Malformed
        );
        for t in ["\0.\0.\0", "..", "e30.e30.", "%%%.e30.x", "\u{FFFD}"] {
            assert!(v.verify(t).is_err(), "{t:?}");
        }
    }

    #[test]
    fn deadline_is_exp_plus_leeway() {
        let v = Verifier::new(
            &KeySource::Secret(b"s3cret".to_vec()),
            None,
            None,
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(v.deadline(1000), UNIX_EPOCH + Duration::from_secs(1005));
    }

    #[test]
    fn secrets_are_not_debug_printed() {
        let s = format!("{:?}", KeySource::Secret(b"hunter2".to_vec()));
        assert!(!s.contains("hunter2"));
    }
}
