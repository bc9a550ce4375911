//! XEP-0335 JSON Containers: `<json xmlns='urn:xmpp:json:0'>…</json>`.
//!
//! xmpp-parsers has a `JsonContainer` whose field is private (it can be neither built nor read from
//! outside the crate), so this small typed one is ours.

use minidom::Element;
use serde_json::Value;

/// The namespace.
pub const NS: &str = "urn:xmpp:json:0";

/// A JSON value carried in a stanza.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonContainer(pub Value);

/// Why an element is not a JSON container.
#[derive(Debug, thiserror::Error)]
pub enum JsonContainerError {
    /// Another element.
    #[error("not a <json xmlns='urn:xmpp:json:0'/> element")]
    NotJson,
    /// Child elements are not allowed.
    #[error("<json/> must contain text only")]
    Children,
    /// The text is not JSON.
    #[error("<json/> does not hold valid JSON: {0}")]
    Invalid(#[from] serde_json::Error),
}

impl From<JsonContainer> for Element {
    fn from(j: JsonContainer) -> Element {
        element_of_text(j.0.to_string())
    }
}

/// A JSON container around JSON already written as text (the caller's to keep valid).
pub fn element_of_text(json: String) -> Element {
    Element::builder("json", NS).append(json).build()
}

impl TryFrom<Element> for JsonContainer {
    type Error = JsonContainerError;
    fn try_from(el: Element) -> Result<Self, Self::Error> {
        if !el.is("json", NS) {
            return Err(JsonContainerError::NotJson);
        }
        if el.children().next().is_some() {
            return Err(JsonContainerError::Children);
        }
        Ok(JsonContainer(serde_json::from_str(&el.text())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects() {
        let el: Element = "<json xmlns='urn:xmpp:json:0'>{\"type\":\"Create\",\"n\":[1,2]}</json>"
            .parse()
            .expect("literal");
        let j = JsonContainer::try_from(el.clone()).expect("valid");
        assert_eq!(j.0["type"], "Create");
        let back = Element::from(j.clone());
        assert_eq!(JsonContainer::try_from(back).expect("round trip"), j);
        let child: Element = "<json xmlns='urn:xmpp:json:0'><x/></json>"
            .parse()
            .expect("literal");
        assert!(matches!(
            JsonContainer::try_from(child),
            Err(JsonContainerError::Children)
        ));
        let bad: Element = "<json xmlns='urn:xmpp:json:0'>{nope</json>"
            .parse()
            .expect("literal");
        assert!(matches!(
            JsonContainer::try_from(bad),
            Err(JsonContainerError::Invalid(_))
        ));
        let other: Element = "<body xmlns='jabber:client'>x</body>"
            .parse()
            .expect("literal");
        assert!(matches!(
            JsonContainer::try_from(other),
            Err(JsonContainerError::NotJson)
        ));
    }
}
