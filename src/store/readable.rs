//! What the search index keeps of a message's JSON payload (an Activity Streams activity), read in
//! one pass over its text: its readable strings (a case's title, labels, people; not its URLs, ids,
//! types or dates) and, for a comment created or edited, the comment's URL (`archive_ref`).
//!
//! Walked with serde's visitors, no document is built: reading the payload into a
//! `serde_json::Value` first, then walking it, was 7 % of the runtime thread's samples per webhook
//! delivery (BENCHMARKS.md §5, stop 30). Strings come in document order, where the `Value` walk gave
//! them in key order; only their words are indexed, so a search finds the same messages.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// Keys whose string values are not searchable text.
const SKIP: &[&str] = &[
    "id",
    "type",
    "@context",
    "url",
    "href",
    "published",
    "updated",
    "mediaType",
];

/// Append `json`'s readable strings to `text` (not past `max` bytes: a string is added only while
/// `text` is shorter) and return the comment URL it shows; a payload that is not JSON adds nothing.
pub fn read_into(json: &str, text: &mut String, max: usize) -> Option<String> {
    let before = text.len();
    let mut found = Found {
        text,
        max,
        event_is_comment: false,
        shown: false,
        url: None,
    };
    let mut de = serde_json::Deserializer::from_str(json);
    let read = Walk {
        found: &mut found,
        skip: false,
        role: Role::Top,
    }
    .deserialize(&mut de)
    .and_then(|()| de.end());
    if read.is_err() {
        found.text.truncate(before);
        return None;
    }
    let url = found.url.take();
    (found.event_is_comment && found.shown)
        .then_some(url)
        .flatten()
        .filter(|u| !u.is_empty() && u.len() <= 2048)
}

struct Found<'t> {
    text: &'t mut String,
    max: usize,
    /// The top level's `caseroom:event` is "comment" (the last one, as a parsed document keeps it).
    event_is_comment: bool,
    /// The top level's `type` is Create or Update.
    shown: bool,
    /// The top level's `object.url`.
    url: Option<String>,
}

/// Where a value sits, for the parts [`read_into`] returns besides text.
#[derive(Clone, Copy, PartialEq)]
enum Role {
    /// The document itself.
    Top,
    /// The top level's `caseroom:event`.
    Event,
    /// The top level's `type`.
    Type,
    /// The top level's `object`.
    Object,
    /// `url` in the top level's `object`.
    ObjectUrl,
    /// Anything else.
    Other,
}

struct Walk<'f, 't> {
    found: &'f mut Found<'t>,
    /// The key this value (or the array holding it) is under is one of [`SKIP`].
    skip: bool,
    role: Role,
}

impl<'de> DeserializeSeed<'de> for Walk<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        // A value in a role is reset first: a later duplicate key wins, whatever its type.
        match self.role {
            Role::Event => self.found.event_is_comment = false,
            Role::Type => self.found.shown = false,
            Role::Object | Role::ObjectUrl => self.found.url = None,
            Role::Top | Role::Other => {}
        }
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("JSON")
    }
    fn visit_str<E>(self, s: &str) -> Result<(), E> {
        let f = self.found;
        if !self.skip && !s.starts_with("http") && f.text.len() < f.max {
            f.text.push_str(s);
            f.text.push('\n');
        }
        match self.role {
            Role::Event => f.event_is_comment = s == "comment",
            Role::Type => f.shown = matches!(s, "Create" | "Update"),
            Role::ObjectUrl => f.url = Some(s.to_owned()),
            _ => {}
        }
        Ok(())
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        // Elements count as under the array's key; none of them has a role.
        while seq
            .next_element_seed(Walk {
                found: &mut *self.found,
                skip: self.skip,
                role: Role::Other,
            })?
            .is_some()
        {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let role = match (self.role, key) {
                (Role::Top, Key::Event) => Role::Event,
                (Role::Top, Key::Type) => Role::Type,
                (Role::Top, Key::Object) => Role::Object,
                (Role::Object, Key::Url) => Role::ObjectUrl,
                _ => Role::Other,
            };
            map.next_value_seed(Walk {
                found: &mut *self.found,
                skip: key.skipped(),
                role,
            })?;
        }
        Ok(())
    }
}

/// An object key, as far as [`Walk`] cares.
#[derive(Clone, Copy, PartialEq)]
enum Key {
    Event,
    Type,
    Object,
    Url,
    /// Another key of [`SKIP`].
    Skipped,
    Other,
}

impl Key {
    fn skipped(self) -> bool {
        matches!(self, Key::Type | Key::Url | Key::Skipped)
    }
}

struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Key;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Key, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Key;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }
    fn visit_str<E>(self, k: &str) -> Result<Key, E> {
        Ok(match k {
            "caseroom:event" => Key::Event,
            "type" => Key::Type,
            "object" => Key::Object,
            "url" => Key::Url,
            k if SKIP.contains(&k) => Key::Skipped,
            _ => Key::Other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What one payload gave.
    #[derive(Debug, Default, PartialEq)]
    struct Readable {
        text: String,
        comment_url: Option<String>,
    }

    /// The reading this module replaced, kept as the reference: the payload parsed into a
    /// document, then walked.
    fn by_document(json: &str, max: usize) -> Readable {
        let mut text = String::new();
        let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
            return Readable::default();
        };
        fn walk(v: &serde_json::Value, key: &str, out: &mut String, max: usize) {
            match v {
                serde_json::Value::String(s)
                    if !SKIP.contains(&key) && !s.starts_with("http") && out.len() < max =>
                {
                    out.push_str(s);
                    out.push('\n');
                }
                serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, key, out, max)),
                serde_json::Value::Object(o) => o.iter().for_each(|(k, x)| walk(x, k, out, max)),
                _ => {}
            }
        }
        walk(&v, "", &mut text, max);
        let is_comment = v.get("caseroom:event").and_then(|e| e.as_str()) == Some("comment");
        let shown = matches!(
            v.get("type").and_then(|t| t.as_str()),
            Some("Create" | "Update")
        );
        let comment_url = (is_comment && shown)
            .then(|| v.pointer("/object/url")?.as_str().map(str::to_owned))
            .flatten()
            .filter(|u| !u.is_empty() && u.len() <= 2048);
        Readable { text, comment_url }
    }

    fn streamed(json: &str, max: usize) -> Readable {
        let mut text = String::new();
        let comment_url = read_into(json, &mut text, max);
        Readable { text, comment_url }
    }

    fn lines(s: &str) -> Vec<&str> {
        let mut l: Vec<&str> = s.lines().collect();
        l.sort_unstable();
        l
    }

    fn same(json: &str) {
        let (a, b) = (streamed(json, usize::MAX), by_document(json, usize::MAX));
        assert_eq!(lines(&a.text), lines(&b.text), "{json}");
        assert_eq!(a.comment_url, b.comment_url, "{json}");
    }

    /// Every real payload in `fixtures/` gives the same strings (in another order) as the document
    /// walk did.
    #[test]
    fn every_fixture_reads_as_the_document_walk_did() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
        let mut files = vec![root];
        let mut read = 0;
        while let Some(p) = files.pop() {
            if p.is_dir() {
                files.extend(
                    std::fs::read_dir(&p)
                        .expect("fixtures")
                        .map(|e| e.expect("entry").path()),
                );
            } else if p.extension().is_some_and(|e| e == "json") {
                let json = std::fs::read_to_string(&p).expect("fixture");
                if serde_json::from_str::<serde_json::Value>(&json).is_ok() {
                    same(&json);
                    read += 1;
                }
            }
        }
        assert!(read >= 20, "only {read} fixtures");
    }

    /// The activities caseroom writes: a comment created or edited shows its URL; anything else,
    /// or the same with a key of another type, does not; the last of duplicate keys counts.
    #[test]
    fn the_comment_url_is_found_where_the_document_walk_found_it() {
        let cases = [
            r#"{"type":"Create","caseroom:event":"comment","object":{"url":"https://t/1#c2","name":"Fix it"}}"#,
            r#"{"type":"Update","caseroom:event":"comment","object":{"url":"https://t/1#c2"}}"#,
            r#"{"type":"Delete","caseroom:event":"comment","object":{"url":"https://t/1#c2"}}"#,
            r#"{"type":"Create","caseroom:event":"opened","object":{"url":"https://t/1"}}"#,
            r#"{"type":5,"caseroom:event":"comment","object":{"url":"https://t/1#c2"}}"#,
            r#"{"type":"Create","caseroom:event":"comment","object":["url"]}"#,
            r#"{"type":"Create","caseroom:event":"comment","object":{"url":7}}"#,
            r#"{"type":"Create","caseroom:event":"comment","object":{"url":""}}"#,
            r#"{"object":{"object":{"url":"deep"}},"type":"Create","caseroom:event":"comment"}"#,
            r#"[{"type":"Create","caseroom:event":"comment","object":{"url":"u"}}]"#,
            r#""just a string""#,
            r#"{"summary":"caf\u00e9 \"quoted\"","tag":[{"name":"bug"},{"href":"http://x"}],"id":"x"}"#,
        ];
        for json in cases {
            same(json);
        }
        // Duplicate keys: the last one decides, as in a parsed document. (The earlier value's
        // strings are still indexed, where a document dropped them; caseroom's own payloads are
        // serialised from maps and have none.)
        for json in [
            r#"{"type":"Create","caseroom:event":"comment","object":{"url":"u1"},"object":{"name":"x"}}"#,
            r#"{"type":"Create","caseroom:event":"comment","object":{"url":"u1","url":"u2"}}"#,
            r#"{"type":"Create","type":"Like","caseroom:event":"comment","object":{"url":"u"}}"#,
            r#"{"caseroom:event":"comment","caseroom:event":null,"type":"Create","object":{"url":"u"}}"#,
            r#"{"caseroom:event":"opened","caseroom:event":"comment","type":"Update","object":{"url":"u"}}"#,
        ] {
            assert_eq!(
                streamed(json, usize::MAX).comment_url,
                by_document(json, usize::MAX).comment_url,
                "{json}"
            );
        }
        let long = format!(
            r#"{{"type":"Create","caseroom:event":"comment","object":{{"url":"{}"}}}}"#,
            "u".repeat(2049)
        );
        same(&long);
    }

    /// A payload that is not JSON, or has trailing bytes, adds nothing, not the part read before
    /// the error.
    #[test]
    fn a_payload_that_is_not_json_adds_nothing() {
        for bad in [
            r#"{"summary":"first","tag":"#,
            r#"{"summary":"first"} trailing"#,
            "",
        ] {
            let mut text = "body\n".to_owned();
            assert_eq!(read_into(bad, &mut text, usize::MAX), None);
            assert_eq!(text, "body\n", "{bad}");
            assert_eq!(by_document(bad, usize::MAX), Readable::default());
        }
    }

    /// Strings stop being added once the text reaches the limit.
    #[test]
    fn the_text_stops_at_the_limit() {
        let json = format!(r#"{{"a":"{}","b":["x","y"],"c":"z"}}"#, "w".repeat(100));
        let got = streamed(&json, 50);
        assert_eq!(got.text, format!("{}\n", "w".repeat(100)));
        assert_eq!(streamed(&json, usize::MAX).text.lines().count(), 4);
    }
}
