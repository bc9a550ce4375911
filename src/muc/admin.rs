//! XEP-0045 §9 (muc#admin affiliation lists) and §10 (muc#owner, read-only configuration).
//!
//! xmpp-parsers has no typed muc#admin/muc#owner, so the small element shapes live here.

use minidom::Element;
use xmpp_parsers::{
    data_forms::{DataForm, DataFormType, Field, FieldType},
    jid::{BareJid, Jid},
    muc::user::Affiliation,
    ns,
    stanza_error::DefinedCondition,
};

use super::{Effect, Persist, Room};
use crate::xmpp::outbound::{self, parse_affiliation, UserItem};

/// muc#admin namespace.
pub const NS_ADMIN: &str = "http://jabber.org/protocol/muc#admin";
/// muc#owner namespace.
pub const NS_OWNER: &str = "http://jabber.org/protocol/muc#owner";

type Reply = Result<Option<Element>, (DefinedCondition, String)>;

fn err(cond: DefinedCondition, text: &str) -> Reply {
    Err((cond, text.to_owned()))
}

/// Rank used for "may change" rules: owner > admin > others.
fn rank(a: &Affiliation) -> u8 {
    match a {
        Affiliation::Owner => 3,
        Affiliation::Admin => 2,
        _ => 1,
    }
}

/// Handle a muc#admin get (list) or set (change affiliations).
pub fn handle(
    room: &mut Room,
    requester: &BareJid,
    requester_aff: Affiliation,
    query: &Element,
    is_get: bool,
    out: &mut Vec<Effect>,
) -> Reply {
    if !matches!(requester_aff, Affiliation::Owner | Affiliation::Admin) {
        // §9: only admins and owners manage lists.
        return err(
            DefinedCondition::Forbidden,
            "only owners and admins may manage this room's lists",
        );
    }
    let items: Vec<&Element> = query
        .children()
        .filter(|c| c.is("item", NS_ADMIN))
        .collect();
    if items.is_empty() {
        return err(
            DefinedCondition::BadRequest,
            "expected at least one <item/>",
        );
    }
    let _ = requester;
    if is_get {
        list(room, items[0])
    } else {
        set(room, requester_aff, &items, out)
    }
}

/// §9.5 and friends: the JIDs with the affiliation the (first) item names.
fn list(room: &Room, item: &Element) -> Reply {
    let Some(aff) = item.attr("affiliation").and_then(parse_affiliation) else {
        return err(
            DefinedCondition::BadRequest,
            "list requests need an affiliation='owner|admin|member|outcast'",
        );
    };
    let mut q = Element::builder("query", NS_ADMIN).build();
    for (jid, a) in room.info.affiliations.iter().filter(|(_, a)| **a == aff) {
        q.append_child(outbound::item_element(
            NS_ADMIN,
            &UserItem {
                affiliation: a.clone(),
                role: None,
                jid: Some(Jid::from(jid.clone())),
                nick: None,
                reason: None,
            },
        ));
    }
    Ok(Some(q))
}

/// Change affiliations: every item is validated first, the set is all or nothing (§9 / §10
/// examples), and the room keeps at least one owner (§10.5).
fn set(
    room: &mut Room,
    requester_aff: Affiliation,
    items: &[&Element],
    out: &mut Vec<Effect>,
) -> Reply {
    let mut changes = Vec::new();
    for item in items {
        let Some(aff) = item.attr("affiliation").and_then(parse_affiliation) else {
            if item.attr("role").is_some() {
                return err(
                    DefinedCondition::FeatureNotImplemented,
                    "role changes are not supported: roles follow affiliations from the tracker",
                );
            }
            return err(
                DefinedCondition::BadRequest,
                "each item needs an affiliation",
            );
        };
        let Some(jid) = item.attr("jid").and_then(super::parse_bare) else {
            return err(DefinedCondition::BadRequest, "each item needs a jid");
        };
        let current = room.affiliation(&jid);
        // §9/§10: admins may not touch owners/admins nor grant admin/owner; owners may do anything,
        // but the last owner cannot be removed (§10.5).
        if requester_aff != Affiliation::Owner && (rank(&current) >= 2 || rank(&aff) >= 2) {
            return err(
                DefinedCondition::NotAllowed,
                "only owners may change owners and admins",
            );
        }
        changes.push((jid, aff));
    }
    let owners_after = room
        .info
        .affiliations
        .iter()
        .filter(|(j, a)| {
            **a == Affiliation::Owner
                && !changes
                    .iter()
                    .any(|(cj, ca)| cj == *j && *ca != Affiliation::Owner)
        })
        .count()
        + changes
            .iter()
            .filter(|(_, a)| *a == Affiliation::Owner)
            .count();
    if owners_after == 0 {
        return err(
            DefinedCondition::Conflict,
            "a room must keep at least one owner",
        );
    }
    for (jid, aff) in changes {
        if aff == Affiliation::None {
            room.info.affiliations.remove(&jid);
        } else {
            room.info.affiliations.insert(jid.clone(), aff.clone());
        }
        out.push(Effect::Persist(Persist::Affiliation {
            room: room.info.name.clone(),
            jid: jid.clone(),
            affiliation: aff,
        }));
        room.affiliation_changed(&jid, out);
    }
    Ok(None)
}

/// muc#owner: the configuration form, read-only (configuration comes from the tracker or the config
/// file). Submitting it is refused with not-allowed; cancel is accepted.
pub fn owner(room: &Room, aff: Affiliation, query: &Element, is_get: bool) -> Reply {
    if aff != Affiliation::Owner {
        return err(
            DefinedCondition::Forbidden,
            "only owners may see the room configuration",
        );
    }
    if is_get {
        let mut q = Element::builder("query", NS_OWNER).build();
        q.append_child(config_form(room).into());
        return Ok(Some(q));
    }
    let cancel = query
        .get_child("x", ns::DATA_FORMS)
        .is_some_and(|x| x.attr("type") == Some("cancel"));
    if cancel {
        return Ok(None);
    }
    err(
        DefinedCondition::NotAllowed,
        "this room is configured by caseroom (tracker or config file); change it there",
    )
}

fn config_form(room: &Room) -> DataForm {
    let f = |var: &str, t: FieldType, label: &str, value: &str| {
        let mut field = Field::new(var, t);
        field.label = Some(label.into());
        field.values = vec![value.into()];
        field
    };
    let fields = vec![
        f(
            "muc#roomconfig_roomname",
            FieldType::TextSingle,
            "Title",
            &room.info.title,
        ),
        f(
            "muc#roomconfig_roomdesc",
            FieldType::TextSingle,
            "Description",
            &room.info.description,
        ),
        f(
            "muc#roomconfig_persistentroom",
            FieldType::Boolean,
            "Persistent",
            "1",
        ),
        f(
            "muc#roomconfig_membersonly",
            FieldType::Boolean,
            "Members only",
            "1",
        ),
        f(
            "muc#roomconfig_publicroom",
            FieldType::Boolean,
            "Listed publicly",
            "0",
        ),
        f(
            "muc#roomconfig_enablearchiving",
            FieldType::Boolean,
            "Archived (MAM)",
            "1",
        ),
        f(
            "muc#roomconfig_whois",
            FieldType::ListSingle,
            "Who may see real JIDs",
            if room.info.anonymous {
                "moderators"
            } else {
                "anyone"
            },
        ),
    ];
    let mut form = DataForm::new(
        DataFormType::Form,
        "http://jabber.org/protocol/muc#roomconfig",
        fields,
    );
    form.title = Some(format!("Configuration of {} (read-only)", room.jid));
    form.instructions =
        Some("This room is managed by caseroom from your tracker; change it there.".into());
    form
}
