//! Bounds on one inbound stream element, enforced while it is parsed (`xmpp::link::guard`: part of
//! the link, the one module that imports tokio-xmpp).
//!
//! Any federated address can send the component a stanza, and the server forwards it unchanged.
//! minidom's element tree is dropped, cloned and serialised recursively, so a stanza nested
//! 10,000 levels deep overflowed the worker's stack and aborted the process. The fix is to never
//! build such a tree: [`Guarded`] wraps tokio-xmpp's `FallibleStreamElement` builder, counts the
//! nesting depth and the bytes of every event it is fed, and once a limit is crossed it drops the
//! partial tree (at most `max_depth + 1` levels, safe to drop) and only counts events until the
//! element's end. The link then answers `policy-violation` (RFC 6120 §8.3.3.12) and goes on; the
//! stream itself stays in sync because rxml still parses every byte.
//!
//! The limits are process-wide (set once from the config before the link starts) because
//! `FromXml::from_events` is a static constructor with no room for per-stream settings.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio_xmpp::minidom::rxml;
use tokio_xmpp::xmlstream::FallibleStreamElement;
use xso::{error::Error, error::FromEventsError, Context, FromEventsBuilder, FromXml};

/// Default for `component.max_stanza_depth`: no XEP payload we know of comes close (a pubsub
/// item holding a data form is about 8 levels deep).
pub const DEFAULT_MAX_DEPTH: usize = 64;
/// Default for `component.max_stanza_bytes`: Prosody's own c2s stanza limit (256 KiB).
pub const DEFAULT_MAX_BYTES: usize = 256 * 1024;

static MAX_DEPTH: AtomicUsize = AtomicUsize::new(DEFAULT_MAX_DEPTH);
static MAX_BYTES: AtomicUsize = AtomicUsize::new(DEFAULT_MAX_BYTES);

/// Set the limits for every stream of this process.
pub fn set_limits(max_depth: usize, max_bytes: usize) {
    MAX_DEPTH.store(max_depth.max(2), Ordering::Relaxed);
    MAX_BYTES.store(max_bytes.max(512), Ordering::Relaxed);
}

/// Which bound an element crossed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    /// Nested deeper than this many levels.
    Depth(usize),
    /// Larger than this many bytes.
    Bytes(usize),
}

impl std::fmt::Display for Exceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exceeded::Depth(n) => write!(f, "stanza nested deeper than {n} levels"),
            Exceeded::Bytes(n) => write!(f, "stanza larger than {n} bytes"),
        }
    }
}

/// The addressing attributes of a refused element, kept so that it can be answered.
#[derive(Debug, Clone, Default)]
pub struct Header {
    /// `message`, `presence`, `iq` or another top-level name.
    pub name: String,
    /// `from`, as sent.
    pub from: Option<String>,
    /// `to`, as sent.
    pub to: Option<String>,
    /// `id`, as sent.
    pub id: Option<String>,
    /// `type`, as sent.
    pub type_: Option<String>,
}

/// One top-level stream element, parsed within the bounds.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // the element is the hot path; boxing it would cost every stanza
pub enum Guarded {
    /// Within bounds: tokio-xmpp's own result (a stanza, a nonza or a parse error).
    Element(FallibleStreamElement),
    /// Refused while parsing; nothing of its content was kept.
    Refused {
        /// Its addressing attributes.
        header: Header,
        /// The bound it crossed.
        exceeded: Exceeded,
    },
}

/// Builder for [`Guarded`].
pub struct GuardedBuilder {
    inner: Option<<FallibleStreamElement as FromXml>::Builder>,
    header: Header,
    depth: usize,
    bytes: usize,
    max_depth: usize,
    max_bytes: usize,
    exceeded: Option<Exceeded>,
}

impl FromXml for Guarded {
    type Builder = GuardedBuilder;

    fn from_events(
        qname: rxml::QName,
        attrs: rxml::AttrMap,
        ctx: &Context<'_>,
    ) -> Result<Self::Builder, FromEventsError> {
        let attr = |name: &str| attrs.get(&rxml::Namespace::NONE, name).cloned();
        let header = Header {
            name: qname.1.to_string(),
            from: attr("from"),
            to: attr("to"),
            id: attr("id"),
            type_: attr("type"),
        };
        // The start tag's own size, approximately (its event metrics are not passed to us).
        let bytes = qname.1.len()
            + attrs
                .iter()
                .map(|((_, k), v)| k.len() + v.len() + 4)
                .sum::<usize>();
        let inner = <FallibleStreamElement as FromXml>::from_events(qname, attrs, ctx)?;
        Ok(GuardedBuilder {
            inner: Some(inner),
            header,
            depth: 1,
            bytes,
            max_depth: MAX_DEPTH.load(Ordering::Relaxed),
            max_bytes: MAX_BYTES.load(Ordering::Relaxed),
            exceeded: None,
        })
    }
}

impl FromEventsBuilder for GuardedBuilder {
    type Output = Guarded;

    fn feed(&mut self, ev: rxml::Event, ctx: &Context<'_>) -> Result<Option<Guarded>, Error> {
        let closing = match &ev {
            rxml::Event::StartElement(m, _, _) => {
                self.depth += 1;
                self.bytes += m.len();
                false
            }
            rxml::Event::EndElement(m) => {
                self.bytes += m.len();
                true
            }
            rxml::Event::Text(m, _) | rxml::Event::XmlDeclaration(m, _) => {
                self.bytes += m.len();
                false
            }
        };
        if self.exceeded.is_none() {
            if self.depth > self.max_depth {
                self.exceeded = Some(Exceeded::Depth(self.max_depth));
            } else if self.bytes > self.max_bytes {
                self.exceeded = Some(Exceeded::Bytes(self.max_bytes));
            }
            if self.exceeded.is_some() {
                // Drop the partial tree now, while it is still shallow.
                self.inner = None;
            }
        }
        let result = match (&mut self.inner, self.exceeded) {
            (Some(inner), _) => inner.feed(ev, ctx)?.map(Guarded::Element),
            (None, Some(exceeded)) if closing && self.depth == 1 => Some(Guarded::Refused {
                header: std::mem::take(&mut self.header),
                exceeded,
            }),
            (None, _) => None,
        };
        if closing {
            self.depth -= 1;
        }
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_xmpp::parsers::stanza::Stanza;
    use tokio_xmpp::xmlstream::XmppStreamElement;

    fn parse(xml: &str) -> Guarded {
        match xso::from_bytes::<Guarded>(xml.as_bytes()) {
            Ok(g) => g,
            Err(e) => panic!("guard failed to parse {:.60}: {e}", xml),
        }
    }

    fn nested(levels: usize) -> String {
        let mut s = String::from(
            "<message xmlns='jabber:component:accept' from='eve@evil.example/x' \
             to='room@rooms.localhost' id='deep' type='groupchat'><body>hi</body>",
        );
        s.push_str(&"<a xmlns='urn:x'>".repeat(levels));
        s.push_str(&"</a>".repeat(levels));
        s.push_str("</message>");
        s
    }

    #[test]
    fn a_normal_message_passes_through() {
        let g = parse(&nested(3));
        let Guarded::Element(FallibleStreamElement::Ok(XmppStreamElement::Stanza(
            Stanza::Message(m),
        ))) = g
        else {
            panic!("expected a message, got {g:?}");
        };
        assert_eq!(m.id.as_ref().map(|i| i.0.as_str()), Some("deep"));
    }

    #[test]
    fn deep_nesting_is_refused_without_building_the_tree() {
        // 100,000 levels: without the guard, dropping the tree overflows this test thread's stack.
        for levels in [DEFAULT_MAX_DEPTH, 10_000, 100_000] {
            match parse(&nested(levels)) {
                Guarded::Refused { header, exceeded } => {
                    assert_eq!(exceeded, Exceeded::Depth(DEFAULT_MAX_DEPTH));
                    assert_eq!(header.name, "message");
                    assert_eq!(header.from.as_deref(), Some("eve@evil.example/x"));
                    assert_eq!(header.id.as_deref(), Some("deep"));
                }
                other => panic!("{levels} levels: expected a refusal, got {other:?}"),
            }
        }
    }

    #[test]
    fn depth_just_under_the_limit_is_parsed() {
        // message (1) + DEFAULT_MAX_DEPTH - 1 nested levels = exactly the limit.
        assert!(matches!(
            parse(&nested(DEFAULT_MAX_DEPTH - 1)),
            Guarded::Element(_)
        ));
    }

    #[test]
    fn oversized_text_is_refused() {
        let body = "x".repeat(DEFAULT_MAX_BYTES + 1);
        let xml = format!(
            "<message xmlns='jabber:component:accept' from='a@b/c' to='r@rooms.localhost'><body>{body}</body></message>"
        );
        assert!(matches!(
            parse(&xml),
            Guarded::Refused {
                exceeded: Exceeded::Bytes(DEFAULT_MAX_BYTES),
                ..
            }
        ));
    }
}
