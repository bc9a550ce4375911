//! The XMPP side: the XEP-0114 link and the typed stanza builders.

pub mod adhoc;
pub mod json;
pub mod link;
pub mod outbound;
pub mod wire;
