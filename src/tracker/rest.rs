//! What every tracker client shares: one HTTP client with timeouts (15 s, connect 5 s), sending with
//! retries for reads only (GET: 3 attempts, backoff 200 ms then 400 ms, on connection errors and 5xx
//! answers; a write is never repeated, it may have taken effect; a timed-out read is not repeated
//! either: a tracker that hangs would keep the person waiting 45 s instead of 15 s for "unreachable",
//! and more load is the last thing it needs), and the mapping of HTTP answers to
//! [`TrackerError`]. Each client adds its authentication headers and says how to read its error bodies.

use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::{Actor, TrackerError};

/// How a tracker authenticates: the key header, the prefix of its value (Gitea: `"token "`), and the
/// header the admin key impersonates a person with.
pub(crate) struct Auth {
    /// Header carrying the key.
    pub header: &'static str,
    /// Prefix of the header's value.
    pub scheme: &'static str,
    /// Impersonation header (`Sudo`, `X-Redmine-Switch-User`).
    pub switch: &'static str,
}

impl Auth {
    /// Headers for a call as `who`: a linked personal token acts as its owner; otherwise the admin
    /// `key` impersonates them; `None` is the admin key itself.
    pub fn headers(&self, key: &str, who: Option<&Actor>) -> Vec<(&'static str, String)> {
        match who {
            Some(Actor { token: Some(t), .. }) => {
                vec![(self.header, format!("{}{t}", self.scheme))]
            }
            Some(a) => vec![
                (self.header, format!("{}{key}", self.scheme)),
                (self.switch, a.login.clone()),
            ],
            None => vec![(self.header, format!("{}{key}", self.scheme))],
        }
    }
}

/// Default for `[[tracker]] max_response_bytes`: far above any page of issues or members (a page of
/// 100 GitLab issues is about 300 KB), far below what would hurt.
pub const DEFAULT_MAX_RESPONSE: usize = 16 * 1024 * 1024;

/// The HTTP client every tracker client uses, with its bound on answer sizes.
pub(crate) struct Http {
    client: reqwest::Client,
    /// Answers larger than this are refused (read in chunks; never buffered beyond it).
    pub max_response: usize,
}

/// The HTTP client every tracker client uses.
pub(crate) fn http_client() -> Result<Http, TrackerError> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .connect_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| TrackerError::Protocol(e.to_string()))?;
    Ok(Http {
        client,
        max_response: DEFAULT_MAX_RESPONSE,
    })
}

/// An answer, whatever its status.
pub(crate) struct Reply {
    /// HTTP status.
    pub status: StatusCode,
    /// Response headers (pagination).
    pub headers: HeaderMap,
    /// Body.
    pub body: Vec<u8>,
}

impl Reply {
    /// The body as JSON: `None` when empty, `Protocol` when unreadable.
    pub fn json(&self) -> Result<Option<Value>, TrackerError> {
        if self.body.is_empty() {
            return Ok(None);
        }
        serde_json::from_slice(&self.body)
            .map(Some)
            .map_err(|e| TrackerError::Protocol(e.to_string()))
    }

    /// The body as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Send one request: `url` is absolute, `headers` carry the authentication. GETs are retried on
/// connection errors and 5xx answers; other methods are sent once. Any status comes back as a
/// [`Reply`]; only failing to reach the tracker is an error (`Unreachable`).
pub(crate) async fn send(
    http: &Http,
    method: Method,
    url: &str,
    headers: &[(&str, String)],
    body: Option<&Value>,
) -> Result<Reply, TrackerError> {
    let idempotent = method == Method::GET;
    let mut delay = Duration::from_millis(200);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut req = http.client.request(method.clone(), url);
        for (k, v) in headers {
            req = req.header(*k, v.as_str());
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) if idempotent && attempt < 3 && !e.is_timeout() => {
                tracing::debug!(error = %e, url, "retrying a tracker read");
                tokio::time::sleep(delay).await;
                delay *= 2;
                continue;
            }
            Err(e) => return Err(TrackerError::Unreachable(e.to_string())),
        };
        let status = resp.status();
        if status.is_server_error() && idempotent && attempt < 3 {
            tracing::debug!(%status, url, "retrying a tracker read");
            tokio::time::sleep(delay).await;
            delay *= 2;
            continue;
        }
        let headers = resp.headers().clone();
        let body = read_capped(resp, http.max_response, url).await?;
        return Ok(Reply {
            status,
            headers,
            body,
        });
    }
}

/// POST an `application/x-www-form-urlencoded` form once (OAuth endpoints, RFC 6749 §4.1.3 and
/// RFC 8628 §3.1/§3.4), asking for JSON back; any status comes back as a [`Reply`].
pub(crate) async fn post_form(
    http: &Http,
    url: &str,
    form: &[(&str, &str)],
) -> Result<Reply, TrackerError> {
    let body = form
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&");
    let resp = http
        .client
        .post(url)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .header("Accept", "application/json")
        .header(
            "User-Agent",
            concat!("caseroom/", env!("CARGO_PKG_VERSION")),
        )
        .body(body)
        .send()
        .await
        .map_err(|e| TrackerError::Unreachable(e.to_string()))?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = read_capped(resp, http.max_response, url).await?;
    Ok(Reply {
        status,
        headers,
        body,
    })
}

/// The body, refused once it grows past `max` bytes (a tracker, or whatever answers in its place,
/// cannot make caseroom buffer without bound).
async fn read_capped(
    mut resp: reqwest::Response,
    max: usize,
    url: &str,
) -> Result<Vec<u8>, TrackerError> {
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Err(too_large(max, url));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| TrackerError::Unreachable(e.to_string()))?
    {
        if body.len() + chunk.len() > max {
            return Err(too_large(max, url));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn too_large(max: usize, url: &str) -> TrackerError {
    TrackerError::Protocol(format!(
        "the answer to {url} is larger than {max} bytes ([[tracker]] max_response_bytes); not read"
    ))
}

/// One JSON request to `api` + `path` (see [`send`]): the answer's JSON (`None` for an empty body)
/// on success, the tracker's error ([`error_for`], naming the method and `path`) otherwise.
pub(crate) async fn call_json(
    http: &Http,
    method: Method,
    (api, path): (&str, &str),
    headers: &[(&str, String)],
    body: Option<&Value>,
    errors: &Errors,
) -> Result<Option<Value>, TrackerError> {
    let what = format!("{method} {path}");
    let reply = send(http, method, &format!("{api}{path}"), headers, body).await?;
    if reply.status.is_success() {
        return reply.json();
    }
    Err(error_for(&reply, &what, errors))
}

/// The body a read must have: an empty answer to `what` is the tracker's error.
pub(crate) fn needed(v: Option<Value>, what: &str) -> Result<Value, TrackerError> {
    v.ok_or_else(|| TrackerError::Protocol(format!("empty answer for {what}")))
}

/// How a client reads its error answers.
pub(crate) struct Errors {
    /// Statuses that carry the tracker's validation message (→ `Rejected`), besides 422.
    pub rejected: &'static [u16],
    /// The tracker's message in an error body, if it has one.
    pub message: fn(&Value) -> Option<String>,
}

/// Map a non-success answer: 401/403 → `Denied` (saying what was refused and the tracker's message),
/// 404 → `NotFound`, 422 and `errors.rejected` → `Rejected` with the tracker's message, others →
/// `Status` with the start of the body. `what` names the request (method and path).
pub(crate) fn error_for(reply: &Reply, what: &str, errors: &Errors) -> TrackerError {
    let message = serde_json::from_slice::<Value>(&reply.body)
        .ok()
        .and_then(|v| (errors.message)(&v));
    let code = reply.status.as_u16();
    match reply.status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => TrackerError::Denied(match message {
            Some(m) => format!("{code} for {what}: {m}"),
            None => format!("{code} for {what}"),
        }),
        StatusCode::NOT_FOUND => TrackerError::NotFound(match message {
            Some(m) => format!("{what}: {m}"),
            None => what.to_owned(),
        }),
        s if s == StatusCode::UNPROCESSABLE_ENTITY || errors.rejected.contains(&code) => {
            TrackerError::Rejected(message.unwrap_or_else(|| reply.text()))
        }
        _ => TrackerError::Status {
            status: code,
            body: reply.text().chars().take(200).collect(),
        },
    }
}

/// `owner/repo` as two encoded path segments (GitHub, Gitea and Forgejo name a repository so).
pub(crate) fn repo_path(group: &str) -> Result<String, TrackerError> {
    match group.split_once('/') {
        Some((owner, repo)) if !owner.is_empty() && !repo.is_empty() && !repo.contains('/') => {
            Ok(format!("{}/{}", encode(owner), encode(repo)))
        }
        _ => Err(TrackerError::NotFound(format!(
            "{group:?} is not a repository (owner/repo)"
        ))),
    }
}

/// A case from an issue of the GitHub family (GitHub, Gitea, Forgejo share its shape): number,
/// title, `state`, the first assignee and the author named by `name`, the web address `url`.
/// Never private: these trackers have no per-issue visibility, the repository's decides.
pub(crate) fn issue_case(
    v: &Value,
    url: Option<String>,
    name: fn(&Value) -> Option<String>,
) -> Result<super::Case, TrackerError> {
    let number = v
        .get("number")
        .and_then(Value::as_u64)
        .ok_or_else(|| TrackerError::Protocol("issue without number".into()))?;
    let state = crate::webhook::text(v, "state").unwrap_or_default();
    Ok(super::Case {
        number,
        title: crate::webhook::text(v, "title").unwrap_or_default(),
        closed: state == "closed",
        status: state,
        assignee: crate::webhook::at(v, "assignees.0")
            .or_else(|| crate::webhook::at(v, "assignee"))
            .and_then(name),
        author: crate::webhook::at(v, "user")
            .and_then(name)
            .unwrap_or_default(),
        url: url.unwrap_or_default(),
        private: false,
    })
}

/// The hook of a list (GitHub's and Gitea's shape) that delivers to `url` (`config.url`).
pub(crate) fn hook_at<'a>(hooks: &'a [Value], url: &str) -> Option<&'a Value> {
    hooks
        .iter()
        .find(|h| crate::webhook::text(h, "config.url").as_deref() == Some(url))
}

/// Whether a hook (GitHub's and Gitea's shape) is active and has every event of `wanted` (or `*`).
pub(crate) fn hook_complete(hook: &Value, wanted: &[&str]) -> bool {
    let events: Vec<&str> = hook
        .get("events")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let complete = events.contains(&"*") || wanted.iter().all(|e| events.contains(e));
    complete && hook.get("active").and_then(Value::as_bool) != Some(false)
}

/// Percent-encode one URL component (path segment or query value): everything but RFC 3986's
/// unreserved characters.
pub(crate) fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Labels that look like priorities: names starting with "priority" (case-insensitive), which
/// covers scoped labels such as `priority/high` (Gitea/Forgejo) and `priority::high` (GitLab).
pub(crate) fn priority_labels(labels: &[String]) -> Vec<String> {
    labels
        .iter()
        .filter(|l| l.to_lowercase().starts_with("priority"))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{encode, priority_labels};

    #[test]
    fn priorities_are_priority_labels() {
        let labels = [
            "bug",
            "Priority: High",
            "priority::low",
            "priority/urgent",
            "prior art",
        ]
        .map(String::from);
        assert_eq!(
            priority_labels(&labels),
            ["Priority: High", "priority::low", "priority/urgent"]
        );
    }

    #[test]
    fn encodes_components() {
        assert_eq!(encode("group/sub/project"), "group%2Fsub%2Fproject");
        assert_eq!(encode("a b+c"), "a%20b%2Bc");
        assert_eq!(encode("é"), "%C3%A9");
    }
}
