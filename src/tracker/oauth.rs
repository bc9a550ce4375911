//! Linking without pasting: the OAuth 2.0 device authorization grant (RFC 8628), where the tracker
//! offers it (GitHub, GitLab), with an OAuth application of the operator's (`oauth_client_id`).
//!
//! caseroom asks for a device code (§3.1–3.2), shows the person the verification address and the
//! user code, and polls the token endpoint at the interval the tracker asked for (§3.4–3.5:
//! `authorization_pending` goes on, `slow_down` adds 5 seconds, anything else ends it) until the
//! person approved, refused, or the code expired. Tokens that expire come with a refresh token
//! (RFC 6749 §6), used before they run out.
//!
//! Endpoints: GitHub `<web>/login/device/code` and `<web>/login/oauth/access_token` (docs.github.com,
//! "Authorizing OAuth apps", device flow); GitLab `<web>/oauth/authorize_device` and `<web>/oauth/token`
//! (GitLab docs, OAuth 2.0 identity provider API, device authorization grant flow).

use std::time::Duration;

use serde_json::Value;

use super::{rest, TrackerError};
use crate::webhook::{text, TrackerKind};

/// Where a tracker's device flow lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// Device authorization endpoint.
    pub device: String,
    /// Token endpoint.
    pub token: String,
}

/// The device flow's endpoints of a tracker whose web address is `web`, if it has one.
pub fn endpoints(kind: TrackerKind, web: &str) -> Option<Endpoints> {
    let web = web.trim_end_matches('/');
    match kind {
        TrackerKind::Github => {
            // `url = "https://api.github.com"` is accepted for the REST client: the flow is on the web host.
            let web = if web == "https://api.github.com" {
                "https://github.com"
            } else {
                web
            };
            Some(Endpoints {
                device: format!("{web}/login/device/code"),
                token: format!("{web}/login/oauth/access_token"),
            })
        }
        TrackerKind::Gitlab => Some(Endpoints {
            device: format!("{web}/oauth/authorize_device"),
            token: format!("{web}/oauth/token"),
        }),
        _ => None,
    }
}

/// The scopes caseroom asks for: enough to read and write issues as the person.
pub fn scope(kind: TrackerKind) -> &'static str {
    match kind {
        TrackerKind::Gitlab => "api",
        _ => "repo",
    }
}

/// A device authorization answer (RFC 8628 §3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCode {
    /// For the token requests (never shown).
    pub device_code: String,
    /// What the person types.
    pub user_code: String,
    /// Where they type it.
    pub verification_uri: String,
    /// The same with the code filled in, when the tracker gives one.
    pub verification_uri_complete: Option<String>,
    /// Seconds until the codes expire.
    pub expires_in: u64,
    /// Seconds to wait between token requests (5 when the tracker says nothing).
    pub interval: u64,
}

/// Tokens granted (RFC 6749 §5.1).
#[derive(Clone, PartialEq, Eq)]
pub struct Grant {
    /// The access token.
    pub access_token: String,
    /// For a new access token once this one expires.
    pub refresh_token: Option<String>,
    /// Seconds the access token lives, when it expires.
    pub expires_in: Option<u64>,
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grant")
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

/// One token request's outcome (RFC 8628 §3.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Poll {
    /// Not approved yet: ask again after the interval.
    Pending,
    /// Asked too often: add 5 seconds to the interval.
    SlowDown,
    /// Approved.
    Granted(Grant),
    /// Refused, expired, or an error: the reason.
    Failed(String),
}

/// A client of one tracker's device flow.
pub struct DeviceFlow {
    http: rest::Http,
    endpoints: Endpoints,
    client_id: String,
}

impl DeviceFlow {
    /// For `endpoints` with the operator's OAuth application `client_id`.
    pub fn new(endpoints: Endpoints, client_id: &str) -> Result<DeviceFlow, TrackerError> {
        Ok(DeviceFlow {
            http: rest::http_client()?,
            endpoints,
            client_id: client_id.to_owned(),
        })
    }

    async fn post(&self, url: &str, form: &[(&str, &str)]) -> Result<(u16, Value), TrackerError> {
        let reply = rest::post_form(&self.http, url, form).await?;
        let v = reply.json()?.unwrap_or(Value::Null);
        Ok((reply.status.as_u16(), v))
    }

    /// Ask for a device code (§3.1).
    pub async fn start(&self, scope: &str) -> Result<DeviceCode, TrackerError> {
        let (status, v) = self
            .post(
                &self.endpoints.device,
                &[("client_id", &self.client_id), ("scope", scope)],
            )
            .await?;
        let field = |k: &str| text(&v, k);
        match (
            field("device_code"),
            field("user_code"),
            field("verification_uri"),
        ) {
            (Some(device_code), Some(user_code), Some(verification_uri)) if status < 300 => {
                Ok(DeviceCode {
                    device_code,
                    user_code,
                    verification_uri,
                    verification_uri_complete: field("verification_uri_complete"),
                    expires_in: v.get("expires_in").and_then(Value::as_u64).unwrap_or(900),
                    interval: v.get("interval").and_then(Value::as_u64).unwrap_or(5),
                })
            }
            _ => Err(oauth_error(status, &v, "the device code request")),
        }
    }

    /// Ask once whether the person approved (§3.4).
    pub async fn poll(&self, device_code: &str) -> Result<Poll, TrackerError> {
        let (status, v) = self
            .post(
                &self.endpoints.token,
                &[
                    ("client_id", &self.client_id),
                    ("device_code", device_code),
                    ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                ],
            )
            .await?;
        // GitHub answers errors with 200 and an `error` field; RFC 6749 §5.2 with 400.
        Ok(match text(&v, "error").as_deref() {
            Some("authorization_pending") => Poll::Pending,
            Some("slow_down") => Poll::SlowDown,
            Some(e) => Poll::Failed(match e {
                "access_denied" => "you declined the authorization".to_owned(),
                "expired_token" => "the code expired before it was entered".to_owned(),
                other => text(&v, "error_description").unwrap_or_else(|| other.to_owned()),
            }),
            None => match grant_from(&v) {
                Some(g) if status < 300 => Poll::Granted(g),
                _ => return Err(oauth_error(status, &v, "the token request")),
            },
        })
    }

    /// A new access token for a refresh token (RFC 6749 §6).
    pub async fn refresh(&self, refresh_token: &str) -> Result<Grant, TrackerError> {
        let (status, v) = self
            .post(
                &self.endpoints.token,
                &[
                    ("client_id", &self.client_id),
                    ("grant_type", "refresh_token"),
                    ("refresh_token", refresh_token),
                ],
            )
            .await?;
        match grant_from(&v) {
            Some(g) if status < 300 && text(&v, "error").is_none() => Ok(g),
            _ => Err(oauth_error(status, &v, "the token refresh")),
        }
    }

    /// Poll until the person approved, refused, or the code expired (or `limit` passed), waiting
    /// the interval the tracker asked for between requests.
    pub async fn wait(&self, code: &DeviceCode, limit: Duration) -> Result<Grant, String> {
        let started = std::time::Instant::now();
        let expires = Duration::from_secs(code.expires_in).min(limit);
        let mut interval = Duration::from_secs(code.interval.clamp(1, 60));
        loop {
            tokio::time::sleep(interval).await;
            if started.elapsed() > expires {
                return Err("the code expired before it was entered".into());
            }
            match self.poll(&code.device_code).await {
                Ok(Poll::Pending) => {}
                Ok(Poll::SlowDown) => interval += Duration::from_secs(5),
                Ok(Poll::Granted(g)) => return Ok(g),
                Ok(Poll::Failed(why)) => return Err(why),
                // Unreachable for a moment: keep trying until the code expires (§3.5 allows it).
                Err(TrackerError::Unreachable(_)) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

fn grant_from(v: &Value) -> Option<Grant> {
    Some(Grant {
        access_token: text(v, "access_token").filter(|t| !t.is_empty())?,
        refresh_token: text(v, "refresh_token").filter(|t| !t.is_empty()),
        expires_in: v.get("expires_in").and_then(Value::as_u64),
    })
}

fn oauth_error(status: u16, v: &Value, what: &str) -> TrackerError {
    let why = text(v, "error_description")
        .or_else(|| text(v, "error"))
        .unwrap_or_else(|| format!("HTTP {status}"));
    match status {
        401 | 403 => TrackerError::Denied(format!("{what}: {why}")),
        404 => TrackerError::NotFound(format!("{what}: {why} (is the device flow enabled?)")),
        _ => TrackerError::Rejected(format!("{what}: {why}")),
    }
}
