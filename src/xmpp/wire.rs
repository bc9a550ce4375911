//! Stanzas as the bytes caseroom writes on the component stream, serialised once.
//!
//! tokio-xmpp serialises every stanza it is handed; a room message to 50 occupants used to be
//! built, cloned and serialised 50 times (about 20 µs of caseroom's CPU per delivery). Here a
//! broadcast is serialised once with its `to` left out ([`Template`]) and each recipient's copy is
//! that text with one `to` attribute added: no tree per recipient.
//!
//! The encoder is rxml's (the one minidom and tokio-xmpp use), started inside the stream's default
//! namespace as tokio-xmpp's own writer is, so a stanza's root carries no redundant
//! `xmlns='jabber:component:accept'`; nested elements in other namespaces (`jabber:client` inside a
//! MAM `<forwarded/>`, payloads) declare theirs as usual.

use minidom::rxml::writer::{Encoder, Item, SimpleNamespaces, TrackNamespace};
use minidom::rxml::{Namespace, NcNameStr};
use minidom::{Element, Node};
use xmpp_parsers::message::Message;
use xso::Item as XsoItem;

/// The default namespace of an XEP-0114 component stream.
pub const STREAM_NS: &str = "jabber:component:accept";

/// An element that cannot be written as XML (a name or text rxml refuses).
#[derive(Debug, thiserror::Error)]
#[error("cannot serialise <{name}>: {reason}")]
pub struct WireError {
    /// The element's name.
    pub name: String,
    /// What rxml said.
    pub reason: String,
}

/// A stanza serialised once, to be copied for many recipients: each copy is `head`, one
/// ` to='…'` attribute, then `tail`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    head: Vec<u8>,
    tail: Vec<u8>,
}

impl Template {
    /// Serialise `stanza`, leaving its `to` (if any) out.
    pub fn new(stanza: &Element) -> Result<Template, WireError> {
        Template::split(|enc, out, split| write_element(enc, stanza, out, Some(split), None))
    }

    /// [`Template::new`] for a message, written straight from the message's own serialisation
    /// ([`write_message`]): no element tree in between, and no copy of the message to make one.
    /// The same bytes as `Template::new(&Element::from(m.clone()))`.
    pub fn of_message(m: &Message) -> Result<Template, WireError> {
        Template::split(|enc, out, split| write_message(enc, m, out, Some(split), false))
    }

    /// What `write` writes, cut where it records the root's `to` belongs.
    fn split(
        write: impl FnOnce(
            &mut Encoder<SimpleNamespaces>,
            &mut Vec<u8>,
            &mut Option<usize>,
        ) -> Result<(), WireError>,
    ) -> Result<Template, WireError> {
        let mut out = Vec::with_capacity(512);
        let mut split = None;
        write(&mut stream_encoder(), &mut out, &mut split)?;
        let at = split.unwrap_or(out.len());
        let tail = out.split_off(at);
        Ok(Template { head: out, tail })
    }

    /// The copy for `to`.
    pub fn copy_for(&self, to: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.head.len() + self.tail.len() + to.len() + 8);
        self.write_for(to, &mut out);
        out
    }

    /// Append the copy for `to` to `out` (the link's write buffer: no allocation per copy).
    pub fn write_for(&self, to: &str, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.head);
        out.extend_from_slice(b" to='");
        escape_attr(to, out);
        out.push(b'\'');
        out.extend_from_slice(&self.tail);
    }
}

/// A message as it goes inside a MAM result's `<forwarded/>`: in `jabber:client` and without `to`,
/// as [`encode`] writes `client_ns(&Element::from(m))` for `m` without `to`, without the two
/// element trees.
pub fn encode_forwarded(m: &Message) -> Result<Vec<u8>, WireError> {
    let mut enc = stream_encoder();
    let mut out = Vec::with_capacity(256);
    write_message(&mut enc, m, &mut out, None, true)?;
    Ok(out)
}

/// Serialise a whole stanza (its `to` included) as it goes on the stream.
pub fn encode(stanza: &Element) -> Result<Vec<u8>, WireError> {
    let mut enc = stream_encoder();
    let mut out = Vec::with_capacity(256);
    write_element(&mut enc, stanza, &mut out, None, None)?;
    Ok(out)
}

/// What goes on the link: a stanza to serialise, or bytes serialised already.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // stanzas are the common case
pub enum Out {
    /// A stanza.
    Stanza(xmpp_parsers::stanza::Stanza),
    /// A stanza as bytes (e.g. a MAM result around a message serialised when it was archived).
    Raw(Vec<u8>),
}

/// A MAM result (XEP-0313 "Query results") around `forwarded`, a message serialised when it was
/// archived ([`encode`]); only the envelope is serialised per query.
pub fn mam_result(
    to: &str,
    from: &str,
    queryid: Option<&str>,
    id: &str,
    stamp: &str,
    forwarded: &[u8],
) -> Result<Vec<u8>, WireError> {
    let mut enc = stream_encoder();
    let mut out = Vec::with_capacity(forwarded.len() + 256);
    let fail = |name: &str, e: &dyn std::fmt::Display| WireError {
        name: name.to_owned(),
        reason: e.to_string(),
    };
    let name = |n: &'static str| -> Result<&'static NcNameStr, WireError> {
        n.try_into().map_err(|e| fail(n, &e))
    };
    let open = |ns: &'static str, n| Ok(Item::ElementHeadStart(Namespace::from(ns), name(n)?));
    let attr = |n, v| Ok(Item::Attribute(Namespace::NONE, name(n)?, v));
    let mut head: Vec<Result<Item<'_>, WireError>> = vec![
        open(STREAM_NS, "message"),
        attr("to", to),
        attr("from", from),
        Ok(Item::ElementHeadEnd),
        open("urn:xmpp:mam:2", "result"),
    ];
    head.extend(queryid.map(|q| attr("queryid", q)));
    head.extend([
        attr("id", id),
        Ok(Item::ElementHeadEnd),
        open("urn:xmpp:forward:0", "forwarded"),
        Ok(Item::ElementHeadEnd),
        open("urn:xmpp:delay", "delay"),
        attr("stamp", stamp),
        Ok(Item::ElementFoot),
    ]);
    for it in head {
        enc.encode(it?, &mut out).map_err(|e| fail("message", &e))?;
    }
    // The archived message, a complete element in its own namespace (jabber:client); then the
    // ends of forwarded, result and message.
    out.extend_from_slice(forwarded);
    for _ in 0..3 {
        enc.encode(Item::ElementFoot, &mut out)
            .map_err(|e| fail("message", &e))?;
    }
    Ok(out)
}

/// Parse bytes written by this module back into an element, as the server reads them (inside the
/// component stream's default namespace). For tests and diagnostics.
pub fn parse(bytes: &[u8]) -> Result<Element, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
    let stream: Element = format!("<stream xmlns='{STREAM_NS}'>{text}</stream>")
        .parse()
        .map_err(|e: minidom::Error| e.to_string())?;
    stream
        .children()
        .next()
        .cloned()
        .ok_or_else(|| "no element".to_owned())
}

/// An encoder positioned inside `<stream:stream xmlns='jabber:component:accept'>`.
fn stream_encoder() -> Encoder<SimpleNamespaces> {
    let mut enc = Encoder::new();
    // As if the stream header had been written: declare its default namespace on an enclosing
    // level (push), so stanzas inherit it instead of declaring it again.
    let ns = enc.ns_tracker_mut();
    ns.declare_fixed(None, Namespace::from(STREAM_NS));
    ns.push();
    enc
}

/// Write `el` and its children. For a template's root (`split` given), `to` is skipped and the
/// position where it belongs (the end of the start tag's attributes) is recorded. Recursion is as
/// deep as the element: caseroom's own stanzas, or inbound ones already bounded by the link's guard.
fn write_element(
    enc: &mut Encoder<SimpleNamespaces>,
    el: &Element,
    out: &mut Vec<u8>,
    mut split: Option<&mut Option<usize>>,
    inherited_lang: Option<&str>,
) -> Result<(), WireError> {
    let fail = |e: &dyn std::fmt::Display| WireError {
        name: el.name().to_owned(),
        reason: e.to_string(),
    };
    let name: &NcNameStr = el.name().try_into().map_err(|e| fail(&e))?;
    enc.encode(Item::ElementHeadStart(Namespace::from(el.ns()), name), out)
        .map_err(|e| fail(&e))?;
    let hoisted = common_lang(el);
    for ((ns, key), value) in el.attrs() {
        if split.is_some() && ns.is_none() && key.as_str() == "to" {
            continue;
        }
        if *ns == Namespace::XML && key.as_str() == "lang" && inherited_lang == Some(value) {
            continue;
        }
        enc.encode(Item::Attribute(ns.clone(), key, value), out)
            .map_err(|e| fail(&e))?;
    }
    if let Some(lang) = hoisted {
        let key: &NcNameStr = "lang".try_into().map_err(|e| fail(&e))?;
        enc.encode(Item::Attribute(Namespace::XML, key, lang), out)
            .map_err(|e| fail(&e))?;
    }
    if let Some(at) = split.as_mut() {
        **at = Some(out.len());
    }
    let mut nodes = el
        .nodes()
        .filter(|n| !is_default_priority(el, n))
        .peekable();
    if nodes.peek().is_some() {
        enc.encode(Item::ElementHeadEnd, out)
            .map_err(|e| fail(&e))?;
        for node in nodes {
            match node {
                Node::Element(child) => write_element(enc, child, out, None, hoisted)?,
                Node::Text(text) => enc.encode(Item::Text(text), out).map_err(|e| fail(&e))?,
            }
        }
    }
    enc.encode(Item::ElementFoot, out).map_err(|e| fail(&e))
}

/// Write a message from the items of its own serialisation (xso's `AsXml`), as [`write_element`]
/// writes the element made of the same items: the root's `to` left out (always: a template adds
/// its own, a forwarded message has none; the tree writes its attributes in name order, xso in
/// field order, and `to` is the only one of a message's that the two put apart) and its position
/// recorded when `split` is given; the children's common `xml:lang` written once on the root
/// ([`common_lang`]); an element with no content closed with `/>`; with `client`, elements of
/// the component namespace written in `jabber:client` (as `outbound::client_ns` rewrites them).
fn write_message(
    enc: &mut Encoder<SimpleNamespaces>,
    m: &Message,
    out: &mut Vec<u8>,
    mut split: Option<&mut Option<usize>>,
    client: bool,
) -> Result<(), WireError> {
    let fail = |e: &dyn std::fmt::Display| WireError {
        name: "message".to_owned(),
        reason: e.to_string(),
    };
    let hoisted = message_lang(m);
    let mut items = xso::AsXml::as_xml_iter(m).map_err(|e| fail(&e))?.peekable();
    let mut depth = 0usize;
    // The root's start tag is still open (its own attributes are being written).
    let mut root_open = false;
    while let Some(item) = items.next() {
        let item = item.map_err(|e| fail(&e))?;
        match &item {
            XsoItem::XmlDeclaration(_) => continue,
            XsoItem::ElementHeadStart(ns, name) => {
                depth += 1;
                root_open = depth == 1;
                if client && ns.as_str() == STREAM_NS {
                    let ns = Namespace::from(xmpp_parsers::ns::JABBER_CLIENT);
                    enc.encode(Item::ElementHeadStart(ns, name), out)
                        .map_err(|e| fail(&e))?;
                    continue;
                }
            }
            XsoItem::Attribute(ns, key, value) => {
                let plain = ns.is_none();
                if depth == 1 && plain && key.as_str() == "to" {
                    continue;
                }
                let xml_lang = *ns == Namespace::XML && key.as_str() == "lang";
                if depth == 2 && xml_lang && hoisted == Some(value.as_ref()) {
                    continue;
                }
            }
            XsoItem::ElementHeadEnd | XsoItem::ElementFoot => {
                if root_open {
                    root_open = false;
                    if let Some(lang) = hoisted {
                        let key: &NcNameStr = "lang".try_into().map_err(|e| fail(&e))?;
                        enc.encode(Item::Attribute(Namespace::XML, key, lang), out)
                            .map_err(|e| fail(&e))?;
                    }
                    if let Some(at) = split.as_mut() {
                        **at = Some(out.len());
                    }
                }
                if matches!(item, XsoItem::ElementFoot) {
                    depth = depth.saturating_sub(1);
                } else if matches!(items.peek(), Some(Ok(XsoItem::ElementFoot))) {
                    // No content: the foot closes it with `/>`.
                    continue;
                }
            }
            XsoItem::Text(_) => {}
        }
        enc.encode(item.as_rxml_item(), out).map_err(|e| fail(&e))?;
    }
    Ok(())
}

/// [`common_lang`] of the element a message is written as: the language every language-tagged
/// child shares (bodies, subjects, payloads; the thread has none).
fn message_lang(m: &Message) -> Option<&str> {
    let bodies = m
        .bodies
        .keys()
        .chain(m.subjects.keys())
        .map(|l| l.0.as_str());
    let payloads = m.payloads.iter().filter_map(lang_of);
    one_lang(bodies.filter(|l| !l.is_empty()).chain(payloads))
}

/// A presence's `<priority>0</priority>`, which xmpp-parsers 0.23 writes into every presence it
/// serialises (its own test of this is marked ignored upstream). RFC 6121 §4.7.2.3: a presence
/// without a priority has priority 0, so leaving it out means the same, and saves 27 bytes on every
/// presence caseroom sends; a join storm of 200 sends about 40,000 (BENCHMARKS.md section 9).
fn is_default_priority(parent: &Element, node: &Node) -> bool {
    let Node::Element(child) = node else {
        return false;
    };
    parent.name() == "presence"
        && child.name() == "priority"
        && child.ns() == parent.ns()
        && child.text().trim() == "0"
}

/// The `xml:lang` that every language-tagged child of a `<message/>` shares (the bodies, as a server
/// hands them over with the sender's stream language), when the message has none of its own. It is
/// written once on the message instead of on each child: the same meaning, since `xml:lang` is
/// inherited (XML 1.0 §2.12), and the servers add it to the message on delivery anyway.
fn common_lang(el: &Element) -> Option<&str> {
    if el.name() != "message" || lang_of(el).is_some() {
        return None;
    }
    one_lang(el.children().filter_map(lang_of))
}

/// The language of `langs` when there is at least one and all are the same.
fn one_lang<'a>(mut langs: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let first = langs.next()?;
    langs.all(|l| l == first).then_some(first)
}

fn lang_of(el: &Element) -> Option<&str> {
    el.attrs()
        .into_iter()
        .find(|((ns, key), _)| **ns == Namespace::XML && key.as_str() == "lang")
        .map(|(_, v)| v.as_str())
}

/// Escape a value for a single-quoted attribute (a JID may hold `'`, `&`, `<` and `>`).
fn escape_attr(value: &str, out: &mut Vec<u8>) {
    // Copied a run at a time: a JID seldom holds any of these.
    let bytes = value.as_bytes();
    let mut start = 0;
    for (i, b) in bytes.iter().enumerate() {
        let entity: &[u8] = match b {
            b'\'' => b"&apos;",
            b'&' => b"&amp;",
            b'<' => b"&lt;",
            b'>' => b"&gt;",
            b'"' => b"&quot;",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(entity);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parse `bytes` as the server does: inside the component stream's default namespace.
    fn on_stream(bytes: &[u8]) -> Element {
        let text = std::str::from_utf8(bytes).expect("utf-8");
        format!("<stream xmlns='{STREAM_NS}'>{text}</stream>")
            .parse::<Element>()
            .expect("well-formed on the stream")
            .children()
            .next()
            .expect("one stanza")
            .clone()
    }

    const MESSAGE: &str = "<message xmlns='jabber:component:accept' from='room@rooms.example.org/Forge' \
        type='groupchat' id='e1'><body>a &lt;b&gt; &amp; 'c'</body>\
        <json xmlns='urn:xmpp:json:0'>{\"x\":\"&lt;\"}</json>\
        <stanza-id xmlns='urn:xmpp:sid:0' by='room@rooms.example.org' id='0006'/>\
        <result xmlns='urn:xmpp:mam:2'><forwarded xmlns='urn:xmpp:forward:0'>\
        <message xmlns='jabber:client' type='groupchat'><body>old</body></message></forwarded></result>\
        </message>";

    /// A message written from its own serialisation is byte for byte what the element tree made of
    /// it gives, as a template and inside `<forwarded/>`, whatever it holds: languages shared or
    /// not, an empty subject, a thread, payloads of every depth, text to escape, no children.
    #[test]
    fn a_message_written_without_a_tree_is_the_same_bytes() {
        let cases = [
            "<message from='a@b/c' to='d@e/f' type='groupchat' xml:lang='en'><body>hi</body></message>",
            "<message from='a@b/c' type='groupchat' id='x1'><body xml:lang='en'>hi</body><body xml:lang='de'>hallo</body></message>",
            "<message from='a@b/c' type='groupchat'><body>no lang</body><x xmlns='urn:x' xml:lang='fr'><y>1</y></x></message>",
            "<message from='r@rooms.x/Bob' type='groupchat'><subject/></message>",
            "<message from='r@rooms.x/Bob' type='groupchat'><subject xml:lang='en'>Topic &amp; more</subject><body xml:lang='en'>b</body></message>",
            "<message from='r@rooms.x/Forge' type='groupchat'><body>Issue #12 &lt;closed&gt; by 'ann' &quot;now&quot; ]]&gt;</body><thread parent='p1'>case-12</thread><json xmlns='urn:xmpp:json:0'>{\"a\":\"&lt;b&gt;\"}</json><occupant-id xmlns='urn:xmpp:occupant-id:0' id='abc'/><stanza-id xmlns='urn:xmpp:sid:0' by='r@rooms.x' id='S1'/></message>",
            "<message from='a@b/c' to='r@rooms.x' type='groupchat'/>",
            "<message from='a@b/c' type='chat'><body>é ü 中文 \u{1F600}</body><active xmlns='http://jabber.org/protocol/chatstates'/><x xmlns='jabber:x:oob'><url>https://x/?a=1&amp;b=2</url><desc/></x></message>",
            "<message from='a@b/c' type='groupchat'><body xml:lang='en'>x</body><reply xmlns='urn:xmpp:reply:0' to='a@b/d' id='m1'/><x xmlns='jabber:component:accept'><body>nested</body></x></message>",
            "<message from='alice@example.org/a' to='team@rooms.example.org' id='1' type='groupchat'><body>hello</body><thread>t</thread><json xmlns='urn:xmpp:json:0'>{}</json><reply xmlns='urn:xmpp:reply:0' id='x'/></message>",
            "<message from='a@b/c' type='error' id='e'><error type='cancel'><not-acceptable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>",
        ];
        for xml in cases {
            let el: Element = xml
                .replacen("<message ", &format!("<message xmlns='{STREAM_NS}' "), 1)
                .parse()
                .expect(xml);
            let m = Message::try_from(el).expect(xml);
            let text = |t: Template| {
                let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                (s(&t.head), s(&t.tail))
            };
            let via_tree = Template::new(&Element::from(m.clone())).expect(xml);
            assert_eq!(
                text(Template::of_message(&m).expect(xml)),
                text(via_tree),
                "template of {xml}"
            );
            let mut no_to = m.clone();
            no_to.to = None;
            let forwarded =
                encode(&crate::xmpp::outbound::client_ns(&Element::from(no_to))).expect(xml);
            let direct = encode_forwarded(&m).expect(xml);
            assert_eq!(
                String::from_utf8_lossy(&direct),
                String::from_utf8_lossy(&forwarded),
                "forwarded {xml}"
            );
        }
    }

    #[test]
    fn a_copy_is_the_stanza_with_its_recipient() {
        let el: Element = MESSAGE.parse().expect("literal");
        let t = Template::new(&el).expect("template");
        let to = "bob@example.org/it's <&> mine";
        let copy = t.copy_for(to);
        let back = on_stream(&copy);
        assert_eq!(back.attr("to"), Some(to));
        let mut expected = el.clone();
        crate::xmpp::outbound::set(&mut expected, "to", to);
        assert_eq!(back, expected, "{}", String::from_utf8_lossy(&copy));
        // No redundant declaration of the stream's namespace on the root; nested ones kept.
        let text = String::from_utf8(copy).expect("utf-8");
        assert!(text.starts_with("<message "), "{text}");
        assert!(!text.contains(STREAM_NS), "{text}");
        assert!(text.contains("xmlns='jabber:client'"), "{text}");
    }

    #[test]
    fn a_template_ignores_a_to_already_set() {
        let mut el: Element = MESSAGE.parse().expect("literal");
        crate::xmpp::outbound::set(&mut el, "to", "old@example.org/x");
        let copy = Template::new(&el)
            .expect("template")
            .copy_for("new@example.org/y");
        let text = String::from_utf8(copy).expect("utf-8");
        assert_eq!(text.matches(" to=").count(), 1, "{text}");
        assert!(text.contains("to='new@example.org/y'"));
    }

    #[test]
    fn a_language_shared_by_the_bodies_is_said_once_on_the_message() {
        let el: Element = "<message xmlns='jabber:component:accept' type='groupchat'>\
            <body xml:lang='en'>hi</body><subject xml:lang='en'>s</subject><thread>t</thread></message>"
            .parse()
            .expect("literal");
        let text = String::from_utf8(encode(&el).expect("encode")).expect("utf-8");
        assert_eq!(text.matches("xml:lang='en'").count(), 1, "{text}");
        assert!(
            text.starts_with("<message type='groupchat' xml:lang='en'>"),
            "{text}"
        );
        // Same meaning: each body's language is still English.
        let back = on_stream(text.as_bytes());
        let body = back.get_child("body", STREAM_NS).expect("body");
        assert_eq!(body.text(), "hi");
        // Different languages stay where they are.
        let two: Element = "<message xmlns='jabber:component:accept'>\
            <body xml:lang='en'>hi</body><body xml:lang='de'>hallo</body></message>"
            .parse()
            .expect("literal");
        let text = String::from_utf8(encode(&two).expect("encode")).expect("utf-8");
        assert!(
            text.contains("<body xml:lang='en'>") && text.contains("<body xml:lang='de'>"),
            "{text}"
        );
    }

    #[test]
    fn a_presence_leaves_out_only_the_default_priority() {
        use xmpp_parsers::presence::{Presence, Type};
        let plain: Element = Presence::new(Type::None).into();
        let text = String::from_utf8(encode(&plain).expect("encodes")).expect("utf-8");
        assert!(!text.contains("priority"), "{text}");
        assert_eq!(on_stream(text.as_bytes()), plain_without_priority(&plain));
        let high: Element = Presence::new(Type::None).with_priority(5).into();
        let text = String::from_utf8(encode(&high).expect("encodes")).expect("utf-8");
        assert!(text.contains("<priority>5</priority>"), "{text}");
        let low: Element = Presence::new(Type::None).with_priority(-1).into();
        let tpl = Template::new(&low).expect("template");
        let copy = String::from_utf8(tpl.copy_for("a@b/c")).expect("utf-8");
        assert!(copy.contains("<priority>-1</priority>"), "{copy}");
    }

    fn plain_without_priority(el: &Element) -> Element {
        let mut out = el.clone();
        out.remove_child("priority", STREAM_NS);
        out
    }

    #[test]
    fn a_whole_stanza_round_trips() {
        let mut el: Element = MESSAGE.parse().expect("literal");
        crate::xmpp::outbound::set(&mut el, "to", "carol@example.org/z");
        let bytes = encode(&el).expect("encode");
        assert_eq!(on_stream(&bytes), el);
        let empty: Element = "<presence xmlns='jabber:component:accept' to='a@b/c'/>"
            .parse()
            .expect("literal");
        assert_eq!(
            String::from_utf8(encode(&empty).expect("encode")).expect("utf-8"),
            "<presence to='a@b/c'/>"
        );
    }
}
