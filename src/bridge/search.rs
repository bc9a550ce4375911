//! `!search words` typed in a room: the room's own history searched (the full-text index that also
//! serves XEP-0431 through MAM), answered privately to the person who asked.
//!
//! Pure: the bridge turns the command into a [`HistorySearch`] for the store's reader and the page
//! it gets back into the answer here.
//!
//! What "links to the hits" can mean in XMPP today: no XEP lets a message point into a room's
//! timeline from a private conversation (XEP-0461 replies refer to a message of the *same*
//! conversation). So each hit names its time and author and quotes the words around the match; an
//! event's hit carries its tracker link (the first line of every event has it); and the hits' archive
//! ids (XEP-0359 stanza ids, what a MAM `ids` query or a client's jump needs) ride along in an
//! XEP-0335 JSON payload for bots and clients that read it.

use minidom::Element;
use xmpp_parsers::jid::BareJid;

use crate::muc::mam::{ArchiveQuery, HistorySearch, MamPage, QueryError};

/// Characters of a message shown per hit.
const EXCERPT: usize = 160;
/// Characters shown before the first word found, when the message is longer than [`EXCERPT`].
const LEAD: usize = 40;

/// What a `!search` asks the store for: the newest matches said before the question (the question
/// itself holds every word). A few more than shown, as earlier searches are left out of the hits.
pub fn request(
    room: &str,
    words: Vec<String>,
    question_id: &str,
    hits: usize,
    asker: BareJid,
    answer_as: &str,
    prefix: &str,
) -> HistorySearch {
    HistorySearch {
        query: ArchiveQuery::search_before(room, words, question_id, hits + hits / 2 + 2),
        asker,
        answer_as: answer_as.to_owned(),
        prefix: prefix.to_owned(),
    }
}

/// One message found.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    /// Archive id (stanza id).
    pub id: String,
    /// When it was said.
    pub at: chrono::DateTime<chrono::Utc>,
    /// Who said it (nick in the room).
    pub nick: String,
    /// The message text.
    pub body: String,
}

/// The hits of a page, newest first, without earlier `!search` questions, at most `max`; and whether
/// more match than are shown.
pub fn hits(s: &HistorySearch, page: &MamPage, max: usize) -> (Vec<Hit>, bool) {
    let question = format!("{}search", s.prefix);
    let mut found: Vec<Hit> = page
        .items
        .iter()
        .rev()
        .filter_map(|item| {
            let xml = std::str::from_utf8(&item.forwarded).ok()?;
            let el: Element = xml.parse().ok()?;
            let body = el.children().find(|c| c.name() == "body")?.text();
            let nick = el
                .attr("from")
                .and_then(|f| f.split_once('/'))
                .map(|(_, n)| n.to_owned())
                .unwrap_or_default();
            Some(Hit {
                id: item.id.clone(),
                at: item.ts,
                nick,
                body,
            })
        })
        .filter(|h| {
            !h.body
                .trim_start()
                .get(..question.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(&question))
        })
        .collect();
    let more = found.len() > max || !page.complete;
    found.truncate(max);
    (found, more)
}

/// The words around the first one found, on one line.
pub fn excerpt(body: &str, words: &[String]) -> String {
    let flat: Vec<char> = body
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .collect();
    if flat.len() <= EXCERPT {
        return flat.into_iter().collect();
    }
    // Lowercased char by char, so positions stay those of `flat`.
    let lower: Vec<char> = flat
        .iter()
        .map(|c| c.to_lowercase().next().unwrap_or(*c))
        .collect();
    let first = words
        .iter()
        .filter_map(|w| {
            let w: Vec<char> = w.chars().collect();
            lower
                .windows(w.len().max(1))
                .position(|win| win == w.as_slice())
        })
        .min()
        .unwrap_or(0);
    let start = first.saturating_sub(LEAD).min(flat.len() - EXCERPT);
    let end = start + EXCERPT;
    let mut out = String::new();
    if start > 0 {
        out.push('…');
    }
    out.extend(&flat[start..end]);
    if end < flat.len() {
        out.push('…');
    }
    out
}

/// The private answer: its text and an XEP-0335 JSON payload with the hits' ids.
pub fn answer(
    s: &HistorySearch,
    page: Result<MamPage, QueryError>,
    max: usize,
) -> (String, Option<Element>) {
    let words = s.query.fulltext.clone().unwrap_or_default();
    let asked = words.join(" ");
    let page = match page {
        Ok(p) => p,
        Err(e) => {
            return (
                format!("the search for \"{asked}\" could not run ({e}); try again in a minute"),
                None,
            )
        }
    };
    let (found, more) = hits(s, &page, max);
    if found.is_empty() {
        return (
            format!(
                "nothing said in this room before your question holds all of \"{asked}\"; \
                 try fewer words (every word must occur; case and accents do not matter)"
            ),
            None,
        );
    }
    let mut text = format!(
        "\"{asked}\" in this room's history, newest first ({} shown):",
        found.len()
    );
    for h in &found {
        text.push_str(&format!(
            "\n• {} {}: {}",
            h.at.format("%Y-%m-%d %H:%M UTC"),
            h.nick,
            excerpt(&h.body, &words)
        ));
    }
    if more {
        text.push_str(&format!(
            "\nMore messages match: add words to narrow it down, or search the whole history from \
             your client (XEP-0431) — {}search shows the newest {max}.",
            s.prefix
        ));
    }
    let json = serde_json::json!({
        "search": asked,
        "hits": found.iter().map(|h| serde_json::json!({
            "id": h.id,
            "at": h.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "nick": h.nick,
        })).collect::<Vec<_>>(),
        "more": more,
    });
    let payload = Element::builder("json", "urn:xmpp:json:0")
        .append(json.to_string())
        .build();
    (text, Some(payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_excerpt_keeps_short_messages_and_centres_long_ones_on_the_word() {
        assert_eq!(
            excerpt("the  build\nfailed", &["build".into()]),
            "the build failed"
        );
        let long = format!("{} needle {}", "a ".repeat(200), "b ".repeat(200));
        let e = excerpt(&long, &["needle".into()]);
        assert!(e.starts_with('…') && e.ends_with('…'), "{e}");
        assert!(e.contains("needle"), "{e}");
        assert_eq!(e.chars().count(), EXCERPT + 2);
        // A word at the very end: the window ends with the message.
        let tail = format!("{} needle", "a ".repeat(200));
        let e = excerpt(&tail, &["needle".into()]);
        assert!(e.ends_with("needle") && e.starts_with('…'), "{e}");
        // Characters whose lowercase is longer in bytes do not shift the window.
        let wide = format!("{} İstanbul needle {}", "Ä ".repeat(150), "x ".repeat(150));
        assert!(excerpt(&wide, &["needle".into()]).contains("needle"));
    }
}
