//! Authenticity, checked on the raw bytes before anything is parsed, in constant time.
//!
//! | kind | header | value |
//! |---|---|---|
//! | github, activitystreams | `X-Hub-Signature-256` | `sha256=` + hex HMAC-SHA256(secret, body) |
//! | gitea | `X-Gitea-Signature` | bare hex HMAC-SHA256 |
//! | forgejo | `X-Forgejo-Signature` | bare hex HMAC-SHA256 |
//! | gitlab | `X-Gitlab-Token` | the secret itself |
//! | jira | `X-Hub-Signature` | `sha256=` + hex HMAC-SHA256 |
//! | redmine | `X-Redmine-Signature-256` | `sha256=` + hex HMAC-SHA256 |

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{Headers, TrackerKind};

/// Why a delivery was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The signature header is missing.
    #[error("missing {0} header")]
    Missing(&'static str),
    /// The header is there but does not match.
    #[error("{0} does not match the configured secret")]
    Mismatch(&'static str),
    /// The header is not of the expected form.
    #[error("{0} is malformed")]
    Malformed(&'static str),
    /// The configured secret is empty: nothing can be verified against it (config validation
    /// refuses this; the check here keeps an empty key from ever matching an empty header).
    #[error("this tracker's secret is empty; no delivery is accepted until one is configured")]
    NoSecret,
    /// An unsigned tracker's delivery came without the URL token.
    #[error("this tracker sends unsigned deliveries: its URL must end in /<token> (the tracker's secret)")]
    TokenMissing,
    /// The URL token is wrong.
    #[error("the token in the URL does not match the tracker's secret")]
    TokenMismatch,
}

/// Compare an unsigned sender's URL token with the secret, in constant time (both are MACed under
/// one key and the MACs compared, so neither length nor prefix leaks through timing).
pub fn token(secret: &[u8], given: &str) -> Result<(), VerifyError> {
    if secret.is_empty() {
        return Err(VerifyError::NoSecret);
    }
    if constant_time_eq(secret, given.as_bytes()) {
        Ok(())
    } else {
        Err(VerifyError::TokenMismatch)
    }
}

/// Equal byte strings, compared in constant time.
fn constant_time_eq(ours: &[u8], theirs: &[u8]) -> bool {
    let key = b"caseroom token comparison";
    let mut a = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    a.update(theirs);
    let mut b = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    b.update(ours);
    a.verify_slice(&b.finalize().into_bytes()).is_ok()
}

/// The signature header a kind uses.
pub fn header_for(kind: TrackerKind) -> &'static str {
    match kind {
        TrackerKind::Github | TrackerKind::Activitystreams => "X-Hub-Signature-256",
        TrackerKind::Gitea => "X-Gitea-Signature",
        TrackerKind::Forgejo => "X-Forgejo-Signature",
        TrackerKind::Gitlab => "X-Gitlab-Token",
        TrackerKind::Jira => "X-Hub-Signature",
        TrackerKind::Redmine => "X-Redmine-Signature-256",
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    hex::decode(s).ok()
}

/// Lower-case hex HMAC-SHA256 (for tests and for signing outgoing requests).
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Check a delivery against the tracker's secret.
pub fn verify(
    kind: TrackerKind,
    secret: &[u8],
    headers: &Headers,
    body: &[u8],
) -> Result<(), VerifyError> {
    if secret.is_empty() {
        return Err(VerifyError::NoSecret);
    }
    let name = header_for(kind);
    let value = headers
        .get(name)
        .map(str::trim)
        .ok_or(VerifyError::Missing(name))?;
    if kind == TrackerKind::Gitlab {
        // A token, not a MAC: compared in constant time.
        return if constant_time_eq(secret, value.as_bytes()) {
            Ok(())
        } else {
            Err(VerifyError::Mismatch(name))
        };
    }
    let hex = match kind {
        TrackerKind::Gitea | TrackerKind::Forgejo => value,
        _ => value
            .strip_prefix("sha256=")
            .ok_or(VerifyError::Malformed(name))?,
    };
    let expected = unhex(&hex.to_ascii_lowercase()).ok_or(VerifyError::Malformed(name))?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    // verify_slice compares in constant time.
    mac.verify_slice(&expected)
        .map_err(|_| VerifyError::Mismatch(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GitHub's documented test vector ("Validating webhook deliveries").
    #[test]
    fn github_test_vector() {
        let secret = b"It's a Secret to Everybody";
        let body = b"Hello, World!";
        assert_eq!(
            sign(secret, body),
            "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
        let ok = Headers::from_pairs(&[(
            "X-Hub-Signature-256",
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
        )]);
        assert_eq!(verify(TrackerKind::Github, secret, &ok, body), Ok(()));
        // An empty key verifies nothing, not even its own signature or an empty GitLab token.
        let empty_sig = Headers(vec![(
            "X-Hub-Signature-256".into(),
            format!("sha256={}", sign(b"", body)),
        )]);
        assert_eq!(
            verify(TrackerKind::Github, b"", &empty_sig, body),
            Err(VerifyError::NoSecret)
        );
        let empty_token = Headers(vec![("X-Gitlab-Token".into(), String::new())]);
        assert_eq!(
            verify(TrackerKind::Gitlab, b"", &empty_token, body),
            Err(VerifyError::NoSecret)
        );
        assert_eq!(token(b"s3cret-token", "s3cret-token"), Ok(()));
        assert_eq!(
            token(b"s3cret-token", "s3cret-toke"),
            Err(VerifyError::TokenMismatch)
        );
        assert_eq!(token(b"s3cret-token", ""), Err(VerifyError::TokenMismatch));
        assert_eq!(token(b"", ""), Err(VerifyError::NoSecret));
        assert_eq!(
            verify(TrackerKind::Github, secret, &ok, b"Hello, World?"),
            Err(VerifyError::Mismatch("X-Hub-Signature-256"))
        );
        assert_eq!(
            verify(TrackerKind::Github, b"other", &ok, body),
            Err(VerifyError::Mismatch("X-Hub-Signature-256"))
        );
        assert_eq!(
            verify(TrackerKind::Github, secret, &Headers::default(), body),
            Err(VerifyError::Missing("X-Hub-Signature-256"))
        );
        let bare = Headers::from_pairs(&[(
            "X-Hub-Signature-256",
            "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
        )]);
        assert_eq!(
            verify(TrackerKind::Github, secret, &bare, body),
            Err(VerifyError::Malformed("X-Hub-Signature-256"))
        );
    }

    #[test]
    fn gitea_forgejo_bare_hex_and_gitlab_token() {
        let sig = sign(b"s", b"{}");
        let h = Headers::from_pairs(&[
            ("X-Gitea-Signature", &sig),
            ("X-Forgejo-Signature", &sig),
            ("X-Gitlab-Token", "s"),
        ]);
        assert_eq!(verify(TrackerKind::Gitea, b"s", &h, b"{}"), Ok(()));
        assert_eq!(verify(TrackerKind::Forgejo, b"s", &h, b"{}"), Ok(()));
        assert_eq!(verify(TrackerKind::Gitlab, b"s", &h, b"anything"), Ok(()));
        assert!(verify(TrackerKind::Gitlab, b"t", &h, b"anything").is_err());
        assert!(verify(TrackerKind::Gitea, b"x", &h, b"{}").is_err());
        // Forgejo must carry its own header.
        let only_gitea = Headers::from_pairs(&[("X-Gitea-Signature", &sig)]);
        assert_eq!(
            verify(TrackerKind::Forgejo, b"s", &only_gitea, b"{}"),
            Err(VerifyError::Missing("X-Forgejo-Signature"))
        );
    }
}
