//! XEP-0030 disco#info / disco#items for the service and its rooms, with the XEP-0128
//! `muc#roominfo` extension form (XEP-0045 §6.4).

use minidom::Element;
use xmpp_parsers::{
    data_forms::{DataForm, DataFormType, Field, FieldType},
    disco::{DiscoInfoResult, DiscoItemsResult, Identity, Item},
    jid::{BareJid, Jid},
    ns,
};

use super::{Room, Service, ServiceConfig};

/// Features every room advertises.
pub const ROOM_FEATURES: &[&str] = &[
    ns::MUC,
    "muc_persistent",
    "muc_membersonly",
    "muc_hidden",
    "muc_unmoderated",
    "muc_unsecured",
    ns::MAM,
    "urn:xmpp:mam:2#extended",
    // XEP-0431: full-text search through the MAM form.
    super::mam::FULLTEXT_NS,
    // XEP-0425: owners and admins retract messages for everyone.
    super::moderation::NS_MODERATE,
    ns::SID,
    ns::OID,
    ns::DISCO_INFO,
    ns::DISCO_ITEMS,
    ns::PING,
    "http://jabber.org/protocol/muc#stable_id",
    // XEP-0050: "New case", "My filters", "Link my tracker account" (answered by the bridge).
    "http://jabber.org/protocol/commands",
];

fn node_of(q: &Element) -> Option<String> {
    q.attr("node").map(str::to_owned)
}

/// The service's own info.
pub fn service_info(cfg: &ServiceConfig, q: &Element) -> Element {
    DiscoInfoResult {
        node: node_of(q),
        identities: vec![Identity::new("conference", "text", "en", cfg.name.clone())],
        features: [
            ns::MUC,
            ns::DISCO_INFO,
            ns::DISCO_ITEMS,
            ns::PING,
            ns::VERSION,
            "urn:xmpp:occupant-id:0",
            "http://jabber.org/protocol/commands",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        extensions: vec![],
    }
    .into()
}

/// Rooms the requester may enter (members-only rooms are hidden from others).
pub fn service_items(svc: &Service, requester: &BareJid) -> Element {
    let mut rooms: Vec<&Room> = svc.rooms().filter(|r| r.may_see(requester)).collect();
    rooms.sort_by(|a, b| a.info.name.cmp(&b.info.name));
    DiscoItemsResult {
        node: None,
        items: rooms
            .into_iter()
            .map(|r| Item {
                jid: Jid::from(r.jid.clone()),
                node: None,
                name: Some(if r.info.title.is_empty() {
                    r.info.name.clone()
                } else {
                    r.info.title.clone()
                }),
            })
            .collect(),
        rsm: None,
    }
    .into()
}

/// A room's info with features and the muc#roominfo form.
pub fn room_info(room: &Room, q: &Element) -> Element {
    let mut features: std::collections::BTreeSet<String> =
        ROOM_FEATURES.iter().map(|s| s.to_string()).collect();
    features.insert(
        if room.info.anonymous {
            "muc_semianonymous"
        } else {
            "muc_nonanonymous"
        }
        .into(),
    );
    let field = |var: &str, value: String| {
        let mut f = Field::new(var, FieldType::TextSingle);
        f.values = vec![value];
        f
    };
    let form = DataForm::new(
        DataFormType::Result_,
        "http://jabber.org/protocol/muc#roominfo",
        vec![
            field("muc#roominfo_description", room.info.description.clone()),
            field("muc#roominfo_subject", room.info.subject.clone()),
            field(
                "muc#roominfo_occupants",
                room.occupants().count().to_string(),
            ),
            field("muc#roomconfig_roomname", room.info.title.clone()),
        ],
    );
    let name = if room.info.title.is_empty() {
        room.info.name.clone()
    } else {
        room.info.title.clone()
    };
    DiscoInfoResult {
        node: node_of(q),
        identities: vec![Identity::new("conference", "text", "en", name)],
        features,
        extensions: vec![form],
    }
    .into()
}

/// Room items: empty (occupant lists are not disclosed through disco, §6.5 allows this).
pub fn room_items(q: &Element) -> Element {
    DiscoItemsResult {
        node: node_of(q),
        items: vec![],
        rsm: None,
    }
    .into()
}
