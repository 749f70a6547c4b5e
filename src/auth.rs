//! JWT verification: a token in, [`Claims`] or an [`AuthError`] out.
//!
//! Only the algorithms of the configured key's family are accepted (`none`
//! never is), `exp` is required, and `aud`/`iss` are enforced when configured.
//! Library error text is never shown to clients: every failure maps to one of
//! a few fixed sentences.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// What a token grants.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Who the token was issued to; used only in logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// NATS subject patterns this token may read.
    #[serde(default)]
    pub subjects: Vec<String>,
}

/// Why a token was refused (401).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "no token: send Authorization: Bearer <jwt>, a token query parameter or a relay_token cookie"
    )]
    Missing,
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("the token has expired")]
    Expired,
    #[error("the token's signature or algorithm is not accepted")]
    BadSignature,
    #[error("the token's claims are not accepted (exp, aud or iss)")]
    BadClaims,
}

/// The key material a relay verifies tokens with.
#[derive(Clone)]
pub enum KeySource {
    /// HS256/384/512 shared secret.
    Secret(Vec<u8>),
    /// PEM contents of an RSA, EC or Ed25519 public key.
    PublicKeyPem(Vec<u8>),
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::Secret(_) => f.write_str("Secret([redacted])"),
            KeySource::PublicKeyPem(_) => f.write_str("PublicKeyPem(..)"),
        }
    }
}

/// Verifies tokens with one key.
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    leeway: Duration,
}

impl Verifier {
    pub fn new(
        source: &KeySource,
        audience: Option<&str>,
        issuer: Option<&str>,
        leeway: Duration,
    ) -> Result<Self, String> {
        let (key, family) = match source {
            KeySource::Secret(s) => {
                if s.is_empty() {
                    return Err("the JWT secret is empty".into());
                }
                (
                    DecodingKey::from_secret(s),
                    jsonwebtoken::AlgorithmFamily::Hmac,
                )
            }
            KeySource::PublicKeyPem(pem) => {
                if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
                    (k, jsonwebtoken::AlgorithmFamily::Rsa)
                } else if let Ok(k) = DecodingKey::from_ec_pem(pem) {
                    (k, jsonwebtoken::AlgorithmFamily::Ec)
                } else if let Ok(k) = DecodingKey::from_ed_pem(pem) {
                    (k, jsonwebtoken::AlgorithmFamily::Ed)
                } else {
                    return Err(
                        "the JWT public key is not a PEM RSA, EC (P-256/P-384) or Ed25519 public key"
                            .into(),
                    );
                }
            }
        };
        let mut validation = Validation::new_for_family(family);
        validation.leeway = leeway.as_secs();
        validation.set_required_spec_claims(&["exp"]);
        match audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = issuer {
            validation.set_issuer(&[iss]);
        }
        Ok(Verifier {
            key,
            validation,
            leeway,
        })
    }

    /// Verifies `token` and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
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

    /// The instant at which a token with `exp` stops being accepted: `exp`
    /// plus the leeway, the same moment a new connection would get 401.
    pub fn deadline(&self, exp: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(exp) + self.leeway
    }
}

/// Signs an HS256 development token (`sse-relay token`).
pub fn sign_hs256(
    secret: &[u8],
    subjects: Vec<String>,
    ttl: Duration,
    sub: Option<String>,
) -> Result<String, jsonwebtoken::errors::Error> {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_add(ttl)
        .as_secs();
    let claims = Claims { exp, sub, subjects };
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
