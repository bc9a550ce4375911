//! Helpers shared by the Rust scenario tests: what the service sends, and a service configuration.
//! Each test binary includes this module and uses part of it.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};

use caseroom::muc::{limits::Rate, ServiceConfig};
use minidom::Element;

/// The stanzas a test's service sent, in order, for the test to take apart.
#[derive(Default)]
pub struct Outbox(VecDeque<Element>);

impl Outbox {
    /// Take the first stanza matching `pred`, or fail listing everything sent.
    pub fn take(&mut self, what: &str, pred: impl Fn(&Element) -> bool) -> Element {
        match self.0.iter().position(&pred) {
            Some(i) => self.0.remove(i).expect("index"),
            None => panic!(
                "expected {what}; sent:\n{}",
                self.0
                    .iter()
                    .map(String::from)
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        }
    }

    /// Fail if any stanza matches `pred`.
    pub fn none(&self, what: &str, pred: impl Fn(&Element) -> bool) {
        if let Some(e) = self.0.iter().find(|e| pred(e)) {
            panic!("expected no {what}, got {}", String::from(e));
        }
    }
}

impl Deref for Outbox {
    type Target = VecDeque<Element>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for Outbox {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// What the link would write, as the server reads it.
pub fn element(out: caseroom::xmpp::wire::Out) -> Element {
    match out {
        caseroom::xmpp::wire::Out::Stanza(s) => Element::from(s),
        caseroom::xmpp::wire::Out::Raw(b) => {
            caseroom::xmpp::wire::parse(&b).expect("the link writes well-formed stanzas")
        }
    }
}

/// The MUC service of the tests, `rooms.example.org`, with the bot nick "Forge" reserved and both
/// per-person rates at `rate` a minute (burst `burst`).
pub fn service_config(per_minute: u32, burst: u32) -> ServiceConfig {
    ServiceConfig {
        domain: "rooms.example.org".parse().expect("domain"),
        name: "caseroom".into(),
        mam_max_page: 100,
        default_history: 20,
        occupant_salt: "salt".into(),
        reserved_nicks: vec!["Forge".into()],
        message_rate: Rate { per_minute, burst },
        query_rate: Rate { per_minute, burst },
        // Joins keep the defaults (60 a minute, 20 at once): tests join often, and the join
        // limit has its own scenario test.
        join_rate: Rate {
            per_minute: 60,
            burst: 20,
        },
        // Presence changes keep the defaults too (60 a minute, 10 at once).
        presence_rate: Rate {
            per_minute: 60,
            burst: 10,
        },
        waiting_per_room: 4,
    }
}
