//! Self-service account links: a person's bare JID → their tracker login and personal API token, per
//! tracker, set through the "Link my tracker account" ad-hoc command.
//!
//! Tokens are secrets, so with SQLite they live in their own small JSON file, not in the database that
//! backups and MAM tooling read: created with mode 0600, rewritten atomically (temporary file in the
//! same directory, fsync, rename), and its mode tightened at start if someone widened it. No token
//! is ever logged: [`Link`]'s `Debug` redacts it and callers log only logins. With PostgreSQL
//! (several instances) they are rows every instance reads: [`crate::store::pg_links`].
//!
//! [`Links`] is the map alone (the bridge core changes it and asks for a write); [`LinksFile`] is
//! the file, read at start and written by the driver, so the core does no IO.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One person's link to one tracker.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    /// The tracker login the token belongs to (as the tracker answered when it was linked).
    pub login: String,
    /// The personal API token.
    pub token: String,
    /// For a new token when this one expires (linked through the device flow, RFC 6749 §6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    /// When the token expires (seconds since the epoch), if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
}

impl Link {
    /// A pasted personal token (it does not expire as far as caseroom knows).
    pub fn token(login: String, token: String) -> Link {
        Link {
            login,
            token,
            refresh_token: None,
            expires_at: None,
        }
    }
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("login", &self.login)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// One person's link set (`Some`) or removed (`None`): what to write where links are rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkChange {
    /// The tracker's name.
    pub tracker: String,
    /// The person's bare JID.
    pub jid: String,
    /// The link now.
    pub link: Option<Link>,
}

/// Errors reading or writing the links file.
#[derive(Debug, thiserror::Error)]
pub enum LinksError {
    /// Reading, writing or renaming failed.
    #[error("links file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not ours or was damaged.
    #[error("links file {path} is not valid JSON: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
}

/// Every link, by tracker name then bare JID.
#[derive(Debug, Default)]
pub struct Links {
    map: BTreeMap<String, BTreeMap<String, Link>>,
}

impl Links {
    /// Every (tracker, bare JID, refresh token) whose token expires before `before` (seconds since
    /// the epoch) and can be refreshed.
    pub fn expiring(&self, before: i64) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        for (tracker, by_jid) in &self.map {
            for (jid, link) in by_jid {
                if let (Some(at), Some(r)) = (link.expires_at, &link.refresh_token) {
                    if at < before {
                        out.push((tracker.clone(), jid.clone(), r.clone()));
                    }
                }
            }
        }
        out
    }

    /// A person's link to a tracker.
    pub fn get(&self, tracker: &str, jid: &str) -> Option<&Link> {
        self.map.get(tracker)?.get(jid)
    }

    /// Link (or re-link) a person, in memory; [`Links::contents`] is what to write.
    pub fn set(&mut self, tracker: &str, jid: &str, link: Link) {
        self.map
            .entry(tracker.to_owned())
            .or_default()
            .insert(jid.to_owned(), link);
    }

    /// Forget a person's link, in memory; true if there was one.
    pub fn remove(&mut self, tracker: &str, jid: &str) -> bool {
        self.map
            .get_mut(tracker)
            .and_then(|m| m.remove(jid))
            .is_some()
    }

    /// No link at all.
    pub fn is_empty(&self) -> bool {
        self.map.values().all(BTreeMap::is_empty)
    }

    /// Every (tracker, bare JID, link).
    pub fn all(&self) -> Vec<(String, String, Link)> {
        self.map
            .iter()
            .flat_map(|(t, by_jid)| {
                by_jid
                    .iter()
                    .map(move |(j, l)| (t.clone(), j.clone(), l.clone()))
            })
            .collect()
    }

    /// How many people linked an account, per tracker.
    pub fn count(&self, tracker: &str) -> usize {
        self.map.get(tracker).map_or(0, BTreeMap::len)
    }

    /// The file's contents for the links as they are now.
    pub fn contents(&self) -> Vec<u8> {
        // A map of strings always serialises; an empty object is the safe fallback all the same.
        serde_json::to_vec_pretty(&self.map).unwrap_or_else(|_| b"{}".to_vec())
    }
}

/// The links file.
#[derive(Debug, Clone)]
pub struct LinksFile {
    path: PathBuf,
}

impl LinksFile {
    /// Where the links of a store at `db` live by default: beside it, `<db>.tokens.json`.
    pub fn default_path(db: &Path) -> PathBuf {
        let mut p = db.as_os_str().to_owned();
        p.push(".tokens.json");
        PathBuf::from(p)
    }

    /// The file at `path`.
    pub fn new(path: &Path) -> LinksFile {
        LinksFile {
            path: path.to_owned(),
        }
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Load the links (a missing file is an empty set), tightening the file's mode to 0600.
    pub fn load(&self) -> Result<Links, LinksError> {
        let path = &self.path;
        let io = |source| LinksError::Io {
            path: path.to_owned(),
            source,
        };
        let map = match std::fs::read(path) {
            Ok(bytes) => {
                let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
                if mode & 0o077 != 0 {
                    tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "links file was readable by others; setting mode 0600");
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                        .map_err(io)?;
                }
                serde_json::from_slice(&bytes).map_err(|source| LinksError::Parse {
                    path: path.to_owned(),
                    source,
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(io(e)),
        };
        Ok(Links { map })
    }

    /// Replace the file with `contents` atomically: a 0600 temporary file beside it, fsync, rename.
    pub fn write(&self, contents: &[u8]) -> Result<(), LinksError> {
        let io = |source| LinksError::Io {
            path: self.path.clone(),
            source,
        };
        let mut tmp = self.path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(contents).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_survive_a_restart_in_a_private_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = LinksFile::default_path(&dir.path().join("caseroom.db"));
        let file = LinksFile::new(&path);
        let mut l = file.load().expect("empty");
        assert!(l.get("redmine", "alice@example.org").is_none());
        l.set(
            "redmine",
            "alice@example.org",
            Link::token("alice".into(), "s3cret-token".into()),
        );
        file.write(&l.contents()).expect("saved");
        let mode = std::fs::metadata(&path).expect("file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let mut again = file.load().expect("reload");
        let link = again.get("redmine", "alice@example.org").expect("kept");
        assert_eq!(link.login, "alice");
        assert_eq!(link.token, "s3cret-token");
        assert!(!format!("{link:?}").contains("s3cret"), "Debug must redact");
        assert_eq!(again.count("redmine"), 1);
        assert!(again.remove("redmine", "alice@example.org"));
        assert!(!again.remove("redmine", "alice@example.org"));
        file.write(&again.contents()).expect("saved");
        assert!(file
            .load()
            .expect("reload")
            .get("redmine", "alice@example.org")
            .is_none());
    }

    #[test]
    fn a_widened_mode_is_tightened_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.json");
        std::fs::write(&path, "{}").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        LinksFile::new(&path).load().expect("open");
        let mode = std::fs::metadata(&path).expect("file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
