//! XEP-0313 (urn:xmpp:mam:2 and #extended) query planning and result building, with XEP-0059 RSM.
//!
//! [`plan`] turns a `<query/>` into an [`ArchiveQuery`] (pure); the store runs it and returns a
//! [`MamPage`]; [`results`] turns the page into `<message><result><forwarded/>` stanzas and the final
//! IQ with `<fin/>`.

use chrono::{DateTime, Utc};
use minidom::Element;
use xmpp_parsers::{
    data_forms::{DataForm, DataFormType, Field, FieldType},
    jid::{BareJid, Jid},
    mam, ns,
    rsm::{First, SetQuery, SetResult},
    stanza_error::DefinedCondition,
};

use super::ArchivedMessage;
use crate::xmpp::outbound;
use crate::xmpp::wire::{self, Out};

/// Filter on the sender.
#[derive(Debug, Clone, PartialEq)]
pub enum With {
    /// An occupant JID room@service/nick.
    Nick(String),
    /// A real bare JID.
    Bare(String),
}

/// Which end of the filtered set a page is cut from.
#[derive(Debug, Clone, PartialEq)]
pub enum Page {
    /// Oldest first, after the given archive id (RSM `<after/>`) or from the start.
    Forward(Option<String>),
    /// Newest first: before the given id (RSM `<before>id</before>`) or the last page (`<before/>`).
    Backward(Option<String>),
}

/// What to fetch.
#[derive(Debug, Clone, PartialEq)]
pub struct ArchiveQuery {
    /// Room localpart.
    pub room: String,
    /// Only metadata (first and last entry) is asked.
    pub metadata: bool,
    /// `start` filter (inclusive).
    pub start: Option<DateTime<Utc>>,
    /// `end` filter (inclusive).
    pub end: Option<DateTime<Utc>>,
    /// `with` filter.
    pub with: Option<With>,
    /// `after-id` (exclusive).
    pub after_id: Option<String>,
    /// `before-id` (exclusive).
    pub before_id: Option<String>,
    /// `ids`.
    pub ids: Option<Vec<String>>,
    /// Paging.
    pub page: Page,
    /// Page size (already capped).
    pub max: usize,
    /// `<flip-page/>`.
    pub flip: bool,
    /// XEP-0431 full-text search: the words, each to be found (already checked and bounded).
    pub fulltext: Option<Vec<String>>,
}

impl ArchiveQuery {
    /// A metadata query (XEP-0313 §6).
    pub fn metadata(room: &str) -> ArchiveQuery {
        ArchiveQuery {
            room: room.to_owned(),
            metadata: true,
            start: None,
            end: None,
            with: None,
            after_id: None,
            before_id: None,
            ids: None,
            page: Page::Forward(None),
            max: 0,
            flip: false,
            fulltext: None,
        }
    }

    /// The newest `max` messages of `room` before the message `before` holding every one of `words`
    /// (a `!search` in the room: what was said before the question).
    pub fn search_before(room: &str, words: Vec<String>, before: &str, max: usize) -> ArchiveQuery {
        ArchiveQuery {
            page: Page::Backward(Some(before.to_owned())),
            max,
            fulltext: Some(words),
            metadata: false,
            ..ArchiveQuery::metadata(room)
        }
    }
}

/// A `!search` typed in a room, on its way to the store and back: answered privately to `asker`.
#[derive(Debug, Clone)]
pub struct HistorySearch {
    /// What to read.
    pub query: ArchiveQuery,
    /// Who asked.
    pub asker: BareJid,
    /// The nick the answer comes from (the room's bot).
    pub answer_as: String,
    /// The room's command prefix, to leave earlier searches out of the hits.
    pub prefix: String,
}

/// One archived message as a page carries it: serialised already, so a query parses nothing.
#[derive(Debug, Clone)]
pub struct PageItem {
    /// Archive id.
    pub id: String,
    /// When it was archived.
    pub ts: DateTime<Utc>,
    /// The message as it goes inside `<forwarded/>` ([`forwarded`]).
    pub forwarded: Vec<u8>,
}

/// A page of results.
#[derive(Debug, Clone, Default)]
pub struct MamPage {
    /// Items in chronological order.
    pub items: Vec<PageItem>,
    /// No more items in the paging direction.
    pub complete: bool,
    /// Size of the whole filtered set (`None`: not counted, see `store::search::COUNT_UP_TO`).
    pub count: Option<usize>,
    /// Index of the first item in the filtered set.
    pub first_index: Option<usize>,
}

impl Page {
    /// Where the page starts: the archive id it pages from, and whether it pages backward (newest
    /// first, rows read in descending order).
    pub fn from(&self) -> (Option<&str>, bool) {
        match self {
            Page::Forward(id) => (id.as_deref(), false),
            Page::Backward(id) => (id.as_deref(), true),
        }
    }
}

impl MamPage {
    /// The metadata answer (XEP-0313 §6): the room's first and last messages.
    pub fn edges(first: Option<PageItem>, last: Option<PageItem>) -> MamPage {
        let items: Vec<PageItem> = first.into_iter().chain(last).collect();
        MamPage {
            count: Some(items.len()),
            items,
            complete: true,
            first_index: None,
        }
    }

    /// A page from up to `q.max + 1` rows read in the page's direction (one more than asked tells
    /// whether the page completes the set), of a filtered set of `count` messages: both stores'
    /// arithmetic, so they answer alike.
    pub fn from_rows(q: &ArchiveQuery, mut rows: Vec<PageItem>, count: usize) -> MamPage {
        let complete = rows.len() <= q.max;
        rows.truncate(q.max);
        if q.page.from().1 {
            rows.reverse();
        }
        // Index of the first item in the filtered set (RSM <first index=…/>), where it is known
        // without another scan: at either end of the set. RSM makes the index optional.
        let first_index = match (&q.page, rows.is_empty()) {
            (_, true) => None,
            (Page::Forward(None), _) => Some(0),
            (Page::Backward(None), _) => Some(count.saturating_sub(rows.len())),
            _ => None,
        };
        MamPage {
            items: rows,
            complete,
            count: Some(count),
            first_index,
        }
    }
}

/// Why a query could not run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QueryError {
    /// An id in after-id/before-id/ids/RSM is not in this room's archive (XEP-0313 §4.1.3, §5.1.2).
    #[error("no message with id {0} in this archive")]
    UnknownId(String),
    /// The store failed.
    #[error("archive unavailable: {0}")]
    Store(String),
}

/// A query in flight.
#[derive(Debug, Clone)]
pub struct MamRequest {
    /// Who asked.
    pub requester: Jid,
    /// The room JID it was sent to.
    pub room_jid: Jid,
    /// IQ id.
    pub iq_id: String,
    /// `queryid` to echo in results.
    pub queryid: Option<String>,
    /// What to fetch.
    pub query: ArchiveQuery,
}

const KNOWN_FIELDS: &[&str] = &[
    "FORM_TYPE",
    "start",
    "end",
    "with",
    "before-id",
    "after-id",
    "ids",
    FULLTEXT_FIELD,
];

/// XEP-0431's namespace (disco feature).
pub const FULLTEXT_NS: &str = "urn:xmpp:fulltext:0";
/// XEP-0431 §3: the MAM form field.
pub const FULLTEXT_FIELD: &str = "{urn:xmpp:fulltext:0}fulltext";
/// A search is at most this many words…
pub const FULLTEXT_MAX_WORDS: usize = 16;
/// …and this many bytes (it is a search box, not a document).
pub const FULLTEXT_MAX_BYTES: usize = 512;

/// The words of a full-text search (XEP-0431 leaves matching to the server: every word must occur,
/// in any order, case and accents ignored; no operators, so nothing a client types is special).
pub fn fulltext_words(value: &str) -> Result<Option<Vec<String>>, (DefinedCondition, String)> {
    if value.len() > FULLTEXT_MAX_BYTES {
        return Err((
            DefinedCondition::PolicyViolation,
            format!("a search is at most {FULLTEXT_MAX_BYTES} bytes"),
        ));
    }
    let words: Vec<String> = value
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    if words.len() > FULLTEXT_MAX_WORDS {
        return Err((
            DefinedCondition::PolicyViolation,
            format!("a search is at most {FULLTEXT_MAX_WORDS} words"),
        ));
    }
    Ok((!words.is_empty()).then_some(words))
}

fn bad(text: impl Into<String>) -> (DefinedCondition, String) {
    (DefinedCondition::BadRequest, text.into())
}

fn parse_time(field: &str, v: &str) -> Result<DateTime<Utc>, (DefinedCondition, String)> {
    DateTime::parse_from_rfc3339(v)
        .map(|d| d.with_timezone(&Utc))
        .map_err(|_| bad(format!("field {field}: {v:?} is not an XEP-0082 date-time")))
}

/// Parse a `<query xmlns='urn:xmpp:mam:2'/>` set into an [`ArchiveQuery`].
// Long by design: one step per form field of XEP-0313 §4.1 and RSM element of XEP-0059, validated in order.
pub fn plan(
    room: &str,
    payload: &Element,
    max_page: usize,
) -> Result<ArchiveQuery, (DefinedCondition, String)> {
    let q = mam::Query::try_from(payload.clone())
        .map_err(|e| bad(format!("malformed MAM query: {e}")))?;
    let mut query = ArchiveQuery {
        room: room.to_owned(),
        metadata: false,
        start: None,
        end: None,
        with: None,
        after_id: None,
        before_id: None,
        ids: None,
        page: Page::Forward(None),
        max: max_page,
        flip: q.flip_page,
        fulltext: None,
    };
    if let Some(form) = &q.form {
        for f in &form.fields {
            let var = f.var.as_deref().unwrap_or("");
            if !KNOWN_FIELDS.contains(&var) {
                // §4.1.1: unknown field → feature-not-implemented.
                return Err((
                    DefinedCondition::FeatureNotImplemented,
                    format!("unsupported MAM field {var:?}"),
                ));
            }
            let value = f.values.first().map(String::as_str).unwrap_or("");
            if value.is_empty() && var != "ids" {
                continue;
            }
            match var {
                "start" => query.start = Some(parse_time("start", value)?),
                "end" => query.end = Some(parse_time("end", value)?),
                "with" => {
                    let jid: Jid = value
                        .parse()
                        .map_err(|_| bad(format!("field with: {value:?} is not a JID")))?;
                    query.with = Some(match jid.resource() {
                        Some(r) => With::Nick(r.as_str().to_owned()),
                        None => With::Bare(jid.to_bare().to_string()),
                    });
                }
                FULLTEXT_FIELD => query.fulltext = fulltext_words(value)?,
                "before-id" => query.before_id = Some(value.to_owned()),
                "after-id" => query.after_id = Some(value.to_owned()),
                "ids" => {
                    // XEP-0313 §4.1.4 lets a server cap what it returns; a longer list is refused
                    // rather than truncated, so the client is not misled about which ids exist.
                    if f.values.len() > max_page {
                        return Err((
                            DefinedCondition::PolicyViolation,
                            format!(
                                "at most {max_page} ids per query (muc.mam_max_page); ask for the rest in another query"
                            ),
                        ));
                    }
                    query.ids = Some(f.values.clone())
                }
                _ => {}
            }
        }
    }
    if let Some(set) = &q.set {
        let SetQuery {
            max,
            after,
            before,
            index,
        } = set;
        if index.is_some() {
            return Err((
                DefinedCondition::FeatureNotImplemented,
                "RSM <index/> is not supported; page with after/before".into(),
            ));
        }
        if let Some(m) = max {
            query.max = (*m).min(max_page);
        }
        query.page = match (after, before) {
            (Some(_), Some(_)) => {
                return Err(bad("RSM after and before together are not supported"))
            }
            (Some(a), None) => Page::Forward(Some(a.clone())),
            (None, Some(b)) if b.is_empty() => Page::Backward(None),
            (None, Some(b)) => Page::Backward(Some(b.clone())),
            (None, None) => Page::Forward(None),
        };
    }
    Ok(query)
}

/// The query form (XEP-0313 §4.1.1), answered to `get`.
pub fn query_form() -> Element {
    let fields = vec![
        Field::new("with", FieldType::JidSingle),
        Field::new("start", FieldType::TextSingle),
        Field::new("end", FieldType::TextSingle),
        Field::new("before-id", FieldType::TextSingle),
        Field::new("after-id", FieldType::TextSingle),
        Field::new("ids", FieldType::TextMulti),
        Field::new(FULLTEXT_FIELD, FieldType::TextSingle),
    ];
    let form = DataForm::new(DataFormType::Form, ns::MAM, fields);
    let mut q = Element::builder("query", ns::MAM).build();
    q.append_child(form.into());
    q
}

/// XEP-0082 stamp, truncated to milliseconds (several clients reject more than 6 digits).
pub fn stamp(ts: DateTime<Utc>) -> xmpp_parsers::date::DateTime {
    let ms = DateTime::<Utc>::from_timestamp_millis(ts.timestamp_millis()).unwrap_or(ts);
    xmpp_parsers::date::DateTime(ms.fixed_offset())
}

/// An archived message as it goes inside a MAM result's `<forwarded/>`, serialised once when it is
/// archived: in `jabber:client` (the namespace a client expects there), without `to`, and without
/// the room's own stanza-id (the result's id is the archive id; XEP-0313 "Query results" allows the
/// copy but no client may depend on it: ≈90 bytes a result). `None` if it cannot be serialised.
pub fn forwarded(m: &ArchivedMessage) -> Option<Vec<u8>> {
    if own_stanza_ids(m).next().is_none() {
        // `encode_forwarded` leaves `to` out itself: nothing to copy.
        return crate::xmpp::wire::encode_forwarded(&m.message).ok();
    }
    forwarded_owned(&mut m.clone())
}

/// [`forwarded`] of a message the caller owns (the archive's path): the room's own stanza-ids are
/// taken out for the serialisation and put back where they were, so the message is not copied.
pub fn forwarded_owned(m: &mut ArchivedMessage) -> Option<Vec<u8>> {
    let at: Vec<usize> = own_stanza_ids(m).collect();
    // From the last, so that the earlier positions still hold.
    let taken: Vec<(usize, Element)> = at
        .iter()
        .rev()
        .map(|&i| (i, m.message.payloads.remove(i)))
        .collect();
    let out = crate::xmpp::wire::encode_forwarded(&m.message).ok();
    for (i, el) in taken.into_iter().rev() {
        m.message.payloads.insert(i, el);
    }
    out
}

/// Positions of the room's own stanza-ids among `m`'s payloads.
fn own_stanza_ids(m: &ArchivedMessage) -> impl Iterator<Item = usize> + '_ {
    m.message.payloads.iter().enumerate().filter_map(|(i, p)| {
        let by = p.attr("by").filter(|_| p.is("stanza-id", ns::SID))?;
        let own = by.strip_prefix(m.room.as_str())?.starts_with('@');
        own.then_some(i)
    })
}

/// A result's `<delay/>` stamp: XEP-0082 in UTC with `Z`, milliseconds kept for ordering.
fn delay_stamp(ts: DateTime<Utc>) -> String {
    ts.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// All stanzas answering `req` with `page` (or an error): one result per item, serialised around the
/// stored bytes, then the `<fin/>`.
pub fn results(req: &MamRequest, page: Result<MamPage, QueryError>) -> Vec<Out> {
    let page = match page {
        Ok(p) => p,
        Err(e) => {
            let cond = match e {
                QueryError::UnknownId(_) => DefinedCondition::ItemNotFound,
                QueryError::Store(_) => DefinedCondition::InternalServerError,
            };
            return vec![Out::Stanza(
                outbound::iq_error(
                    req.room_jid.clone(),
                    req.requester.clone(),
                    &req.iq_id,
                    cond,
                    &e.to_string(),
                )
                .into(),
            )];
        }
    };
    if req.query.metadata {
        let mut md = Element::builder("metadata", ns::MAM).build();
        if let (Some(first), Some(last)) = (page.items.first(), page.items.last()) {
            md.append_child(
                mam::Start {
                    id: first.id.clone(),
                    timestamp: stamp(first.ts),
                }
                .into(),
            );
            md.append_child(
                mam::End {
                    id: last.id.clone(),
                    timestamp: stamp(last.ts),
                }
                .into(),
            );
        }
        return vec![Out::Stanza(
            outbound::iq_result(
                req.room_jid.clone(),
                req.requester.clone(),
                &req.iq_id,
                Some(md),
            )
            .into(),
        )];
    }
    let mut items: Vec<&PageItem> = page.items.iter().collect();
    if req.query.flip {
        items.reverse();
    }
    let (to, from) = (req.requester.to_string(), req.room_jid.to_string());
    let mut out: Vec<Out> = items
        .iter()
        .filter_map(|m| {
            wire::mam_result(
                &to,
                &from,
                req.queryid.as_deref(),
                &m.id,
                &delay_stamp(m.ts),
                &m.forwarded,
            )
            .map_err(
                |e| tracing::warn!(error = %e, id = %m.id, "an archived message could not be sent"),
            )
            .ok()
            .map(Out::Raw)
        })
        .collect();
    let set = SetResult {
        first: items.first().map(|m| First {
            index: if req.query.flip {
                None
            } else {
                page.first_index
            },
            item: m.id.clone(),
        }),
        last: items.last().map(|m| m.id.clone()),
        count: page.count,
    };
    let fin = mam::Fin {
        complete: page.complete,
        set,
    };
    out.push(Out::Stanza(
        outbound::iq_result(
            req.room_jid.clone(),
            req.requester.clone(),
            &req.iq_id,
            Some(fin.into()),
        )
        .into(),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(xml: &str) -> Result<ArchiveQuery, (DefinedCondition, String)> {
        plan("r", &xml.parse::<Element>().expect("literal"), 100)
    }

    #[test]
    fn plans_form_and_rsm() {
        let a = q("<query xmlns='urn:xmpp:mam:2' queryid='f'><x xmlns='jabber:x:data' type='submit'>\
            <field var='FORM_TYPE' type='hidden'><value>urn:xmpp:mam:2</value></field>\
            <field var='start'><value>2026-01-01T00:00:00Z</value></field>\
            <field var='with'><value>r@rooms.example.org/bob</value></field></x>\
            <set xmlns='http://jabber.org/protocol/rsm'><max>500</max><before/></set><flip-page/></query>")
        .expect("valid");
        assert_eq!(a.max, 100, "page size is capped");
        assert_eq!(a.page, Page::Backward(None));
        assert_eq!(a.with, Some(With::Nick("bob".into())));
        assert!(a.flip);
        assert!(a.start.is_some());
    }

    #[test]
    fn unknown_field_is_feature_not_implemented() {
        let e = q(
            "<query xmlns='urn:xmpp:mam:2'><x xmlns='jabber:x:data' type='submit'>\
            <field var='FORM_TYPE' type='hidden'><value>urn:xmpp:mam:2</value></field>\
            <field var='colour'><value>red</value></field></x></query>",
        )
        .expect_err("unknown field");
        assert_eq!(e.0, DefinedCondition::FeatureNotImplemented);
    }

    #[test]
    fn an_ids_list_longer_than_a_page_is_refused() {
        let ids = |n: usize| {
            let values: String = (0..n).map(|i| format!("<value>id{i}</value>")).collect();
            format!(
                "<query xmlns='urn:xmpp:mam:2'><x xmlns='jabber:x:data' type='submit'>\
                 <field var='FORM_TYPE' type='hidden'><value>urn:xmpp:mam:2</value></field>\
                 <field var='ids'>{values}</field></x></query>"
            )
        };
        assert_eq!(
            q(&ids(100)).expect("a page of ids").ids.map(|v| v.len()),
            Some(100)
        );
        let e = q(&ids(10_000)).expect_err("too many ids");
        assert_eq!(e.0, DefinedCondition::PolicyViolation);
        assert!(e.1.contains("at most 100 ids"), "{}", e.1);
    }

    #[test]
    fn bad_date_is_bad_request() {
        let e = q(
            "<query xmlns='urn:xmpp:mam:2'><x xmlns='jabber:x:data' type='submit'>\
            <field var='FORM_TYPE' type='hidden'><value>urn:xmpp:mam:2</value></field>\
            <field var='start'><value>yesterday</value></field></x></query>",
        )
        .expect_err("bad date");
        assert_eq!(e.0, DefinedCondition::BadRequest);
    }

    #[test]
    fn fulltext_field_is_words_bounded_and_offered() {
        let form = |v: &str| {
            format!(
                "<query xmlns='urn:xmpp:mam:2'><x xmlns='jabber:x:data' type='submit'>\
                 <field var='FORM_TYPE'><value>urn:xmpp:mam:2</value></field>\
                 <field var='{{urn:xmpp:fulltext:0}}fulltext'><value>{v}</value></field></x></query>"
            )
        };
        let a = q(&form("Deploy  STAGING, \"now\" OR*")).expect("plans");
        assert_eq!(
            a.fulltext,
            Some(vec![
                "deploy".into(),
                "staging".into(),
                "now".into(),
                "or".into()
            ])
        );
        assert_eq!(q(&form(" ,. ")).expect("plans").fulltext, None);
        let many = vec!["w"; FULLTEXT_MAX_WORDS + 1].join(" ");
        assert_eq!(
            q(&form(&many)).map(|_| ()).map_err(|e| e.0),
            Err(DefinedCondition::PolicyViolation)
        );
        let long = "x".repeat(FULLTEXT_MAX_BYTES + 1);
        assert_eq!(
            q(&form(&long)).map(|_| ()).map_err(|e| e.0),
            Err(DefinedCondition::PolicyViolation)
        );
        assert!(String::from(&query_form()).contains("{urn:xmpp:fulltext:0}fulltext"));
    }

    /// The archive's path serialises the message itself, the room's own stanza-ids taken out and
    /// put back: the same bytes as from a copy with them removed, and the message as it was.
    #[test]
    fn forwarded_from_the_message_itself_is_the_copy_s_bytes_and_leaves_it_whole() {
        let el: Element = "<message xmlns='jabber:component:accept' type='groupchat' \
            from='dev@rooms.example.org/forge' to='ann@example.org/x' id='m1'>\
            <body>a &lt;b&gt; &amp; \u{1F600}</body>\
            <stanza-id xmlns='urn:xmpp:sid:0' by='dev@rooms.example.org' id='first'/>\
            <json xmlns='urn:xmpp:json:0'>{\"type\":\"Create\"}</json>\
            <stanza-id xmlns='urn:xmpp:sid:0' by='devops@rooms.example.org' id='not-ours'/>\
            <stanza-id xmlns='urn:xmpp:sid:0' by='dev@rooms.example.org' id='second'/>\
            </message>"
            .parse()
            .expect("literal");
        let message = xmpp_parsers::message::Message::try_from(el).expect("a message");
        let mut m = ArchivedMessage {
            seq: 1,
            id: "first".into(),
            room: "dev".into(),
            ts: DateTime::<Utc>::from_timestamp_micros(1_000_000).expect("time"),
            nick: "forge".into(),
            sender: "forge@example.org".parse().expect("jid"),
            message,
            origin: None,
            completes_inbox: None,
        };
        let before = m.message.clone();
        let mut copy = m.message.clone();
        copy.to = None;
        copy.payloads.retain(|p| {
            !(p.is("stanza-id", ns::SID) && p.attr("by").is_some_and(|b| b.starts_with("dev@")))
        });
        let want = crate::xmpp::wire::encode_forwarded(&copy).expect("bytes");
        let text = String::from_utf8(want.clone()).expect("utf-8");
        assert!(text.contains("not-ours") && !text.contains("first") && !text.contains("second"));
        assert_eq!(forwarded_owned(&mut m), Some(want.clone()));
        assert_eq!(m.message, before, "the payloads are back where they were");
        assert_eq!(forwarded(&m), Some(want));
    }
}
