//! Mutation fuzzing on stable Rust: every door that takes outside input — each webhook dialect, the
//! chat command grammar, config loading, and inbound stanzas through the parse guard into the MUC
//! core — is fed inputs derived from real seeds (`fixtures/`, the example config, literal stanzas)
//! by byte flips, insertions, deletions, duplications, splices and structure-aware edits. The only
//! property checked is the one that matters at a door: no panic, whatever comes in.
//!
//! `cargo test --test fuzz` runs a short pass (`CASEROOM_FUZZ_ITERS`, default 3,000 inputs per
//! target). The long run: `CASEROOM_FUZZ_ITERS=1000000 cargo test --release --test fuzz -- --nocapture`
//! (prints the count per target). `CASEROOM_FUZZ_SEED` varies the sequence; a failure prints the
//! input that panicked.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

mod common;

use caseroom::config::Config;
use caseroom::muc::{RoomInfo, Service};
use caseroom::webhook::{self, Headers, Normalized, TrackerKind};
use xmpp_parsers::{jid::BareJid, muc::user::Affiliation};

/// xorshift64*: deterministic, seedable, good enough to drive mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

fn iterations() -> usize {
    std::env::var("CASEROOM_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000)
}

fn rng(target: u64) -> Rng {
    let seed = std::env::var("CASEROOM_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_cafe_u64);
    Rng((seed ^ target.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1)
}

/// Interesting fragments to insert: structure, edge values, big numbers, odd unicode.
const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    "\"",
    ":",
    ",",
    "null",
    "true",
    "-1",
    "1e999",
    "18446744073709551616",
    "\"\"",
    "\\u0000",
    "\\ud800",
    "<",
    ">",
    "/>",
    "</",
    "&amp;",
    "&#0;",
    "<![CDATA[",
    "]]>",
    "'",
    "xmlns='",
    "é",
    "\u{202e}",
    "\u{0}",
    "#",
    "@",
    "!",
    "\n",
    "\r\n",
    " ",
    "=",
    "\"id\":",
    "\"number\":",
    "\"action\":",
    "999999999999",
    "%",
    "%zz",
    "+",
    "/",
    "..",
    "${",
    "\t",
];

/// One mutation of `seed` (and sometimes a splice with `other`).
fn mutate(r: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + r.below(4) {
        let len = v.len();
        match r.below(8) {
            0 if len > 0 => {
                let i = r.below(len);
                v[i] ^= 1 << r.below(8);
            }
            1 if len > 0 => {
                let i = r.below(len);
                v[i] = r.next() as u8;
            }
            2 => {
                let t = TOKENS[r.below(TOKENS.len())].as_bytes();
                let i = r.below(len + 1);
                v.splice(i..i, t.iter().copied());
            }
            3 if len > 0 => {
                let i = r.below(len);
                let n = 1 + r.below((len - i).min(64));
                v.drain(i..i + n);
            }
            4 if len > 0 => {
                // Duplicate a chunk (nesting, repetition).
                let i = r.below(len);
                let n = 1 + r.below((len - i).min(256));
                let chunk: Vec<u8> = v[i..i + n].to_vec();
                let at = r.below(len + 1);
                v.splice(at..at, chunk);
            }
            5 if !other.is_empty() => {
                // Splice: our head with another seed's tail.
                let i = r.below(len + 1);
                let j = r.below(other.len());
                v.truncate(i);
                v.extend_from_slice(&other[j..]);
            }
            6 if len > 0 => {
                v.truncate(r.below(len));
            }
            _ => {
                // Replace a digit run (ids, numbers) with an extreme value.
                if let Some(i) = v.iter().position(|b| b.is_ascii_digit()) {
                    let big = [
                        "0",
                        "-1",
                        "4294967296",
                        "99999999999999999999",
                        "1.5",
                        "NaN",
                    ];
                    let t = big[r.below(big.len())].as_bytes();
                    v.splice(i..i + 1, t.iter().copied());
                }
            }
        }
    }
    v
}

/// Run `f` on `iters` mutations of the seeds; panic with the offending input if `f` panics.
fn fuzz(name: &str, target: u64, seeds: &[Vec<u8>], f: impl Fn(&[u8])) {
    assert!(!seeds.is_empty(), "{name}: no seeds");
    let mut r = rng(target);
    let n = iterations();
    // The seeds themselves first.
    for s in seeds {
        f(s);
    }
    for i in 0..n {
        let a = &seeds[r.below(seeds.len())];
        let b = &seeds[r.below(seeds.len())];
        let input = mutate(&mut r, a, b);
        if catch_unwind(AssertUnwindSafe(|| f(&input))).is_err() {
            panic!(
                "{name}: input {i} panicked:\n{:?}",
                String::from_utf8_lossy(&input)
            );
        }
    }
    println!("{name}: {n} generated inputs, no panic");
}

fn fixture_bodies(dir: &str) -> Vec<Vec<u8>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(dir);
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "json")
                && !p.to_string_lossy().ends_with(".expected.json")
        })
        .filter_map(|p| std::fs::read(p).ok())
        .collect();
    out.sort();
    out
}

fn dialect(kind: TrackerKind, dir: &str, target: u64, headers: &[(&str, &str)]) {
    let h = Headers(
        headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    fuzz(
        &format!("webhook {dir}"),
        target,
        &fixture_bodies(dir),
        |body| {
            let _ = webhook::delivery_id(kind, &h, body);
            let _ = webhook::verify::verify(kind, b"fuzz-secret", &h, body);
            let Ok(doc) = webhook::parse_body(Some("application/json"), body) else {
                return;
            };
            let _ = webhook::event_name(kind, &h, &doc);
            let _ = webhook::changes_membership(kind, &h, &doc);
            if let Ok(Normalized::Activity(a)) = webhook::normalize(kind, &h, &doc) {
                let _ = caseroom::render::render("fuzz", &a);
            }
        },
    );
}

#[test]
fn webhook_github() {
    for (i, event) in [
        "issues",
        "issue_comment",
        "push",
        "pull_request",
        "workflow_run",
        "ping",
    ]
    .iter()
    .enumerate()
    {
        dialect(
            TrackerKind::Github,
            "github",
            10 + i as u64,
            &[("X-GitHub-Event", event), ("X-GitHub-Delivery", "d")],
        );
    }
}

#[test]
fn webhook_gitea_and_forgejo() {
    dialect(
        TrackerKind::Gitea,
        "gitea",
        20,
        &[("X-Gitea-Event", "issues")],
    );
    dialect(
        TrackerKind::Gitea,
        "gitea",
        21,
        &[("X-Gitea-Event", "push")],
    );
    dialect(
        TrackerKind::Forgejo,
        "forgejo",
        22,
        &[("X-Forgejo-Event", "pull_request")],
    );
    dialect(
        TrackerKind::Forgejo,
        "forgejo",
        23,
        &[("X-Forgejo-Event", "push")],
    );
}

#[test]
fn webhook_gitlab() {
    for (i, hook) in ["Issue Hook", "Note Hook", "Push Hook", "Merge Request Hook"]
        .iter()
        .enumerate()
    {
        dialect(
            TrackerKind::Gitlab,
            "gitlab",
            30 + i as u64,
            &[("X-Gitlab-Event", hook)],
        );
    }
}

#[test]
fn webhook_jira_redmine_activitystreams() {
    dialect(TrackerKind::Jira, "jira", 40, &[]);
    dialect(TrackerKind::Redmine, "redmine", 41, &[]);
    // AS2 senders post any JSON; every fixture is a fair seed.
    dialect(TrackerKind::Activitystreams, "github", 42, &[]);
}

#[test]
fn command_grammar() {
    let seeds: Vec<Vec<u8>> = [
        "!new Login broken on Safari #bug @bob !high\nSteps: open the page\nthen log in",
        "!new\nTitle on the first description line",
        "!comment 42 works for me now",
        "!comment looks good",
        "!close 42 fixed in 1.2",
        "!reopen 42",
        "!assign 42 @ali",
        "!show 42",
        "!find login timeout",
        "!mine",
        "!help close",
        "!clsoe 4",
        "!mute ci succeeded",
        "!mute event=push branch=!main",
        "!mute #wontfix",
        "!unmute",
        "!filters",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    fuzz("command grammar", 50, &seeds, |input| {
        let text = String::from_utf8_lossy(input);
        let _ = caseroom::commands::parse("!", &text);
        let _ = caseroom::commands::parse(".", &text);
        if let Some(rest) = text.strip_prefix("!mute") {
            if let Ok(rule) = caseroom::filter::parse_mute(rest) {
                let _ = caseroom::filter::describe(&rule);
            }
        }
    });
}

#[test]
fn config_loading() {
    let example = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/caseroom.example.toml"
    ))
    .expect("example");
    let env_seeds = [
        ("CASEROOM_COMPONENT_SECRET", "123456"),
        ("CASEROOM_HTTP_MAX_CONNECTIONS", "99999999999999999999"),
        ("CASEROOM_HTTP_HEADER_TIMEOUT", "1h 99999999999d"),
        ("CASEROOM_MUC_MAM_MAX_PAGE", "-5"),
        ("CASEROOM_STORE_PATH", ""),
        ("CASEROOM_", "x"),
        ("CASEROOM_COMPONENT", "x"),
    ];
    fuzz("config loading", 60, &[example], |input| {
        let text = String::from_utf8_lossy(input);
        let which = input.len() % env_seeds.len();
        let env = vec![(env_seeds[which].0.to_owned(), env_seeds[which].1.to_owned())];
        if let Ok(cfg) = Config::from_toml(&text, &env) {
            let _ = cfg.validate();
        }
        if let Ok(cfg) = Config::from_toml(&text, &[]) {
            let _ = cfg.validate();
        }
    });
}

fn service() -> Service {
    let mut svc = Service::new(common::service_config(1_000_000, 1_000_000), 7);
    let mut affiliations = std::collections::BTreeMap::new();
    for (j, a) in [
        ("alice@example.org", Affiliation::Owner),
        ("bob@example.org", Affiliation::Member),
        ("mallory@example.org", Affiliation::Outcast),
    ] {
        affiliations.insert(j.parse::<BareJid>().expect("jid"), a);
    }
    svc.upsert_room(
        RoomInfo {
            name: "team".into(),
            title: "Team".into(),
            description: String::new(),
            anonymous: false,
            subject: "hi".into(),
            affiliations,
        },
        vec![],
    );
    svc
}

#[test]
fn stanzas_through_the_guard_into_the_core() {
    const R: &str = "team@rooms.example.org";
    const NS: &str = "xmlns='jabber:component:accept'";
    let seeds: Vec<Vec<u8>> = [
        format!("<presence {NS} from='alice@example.org/a' to='{R}/Alice'><x xmlns='http://jabber.org/protocol/muc'><history maxstanzas='5'/></x></presence>"),
        format!("<presence {NS} from='bob@example.org/b' to='{R}/Bob' type='unavailable'/>"),
        format!("<presence {NS} from='mallory@example.org/m' to='{R}/Forge'/>"),
        format!("<message {NS} from='alice@example.org/a' to='{R}' type='groupchat' id='1'><body>hello</body><thread>t</thread><json xmlns='urn:xmpp:json:0'>{{}}</json><reply xmlns='urn:xmpp:reply:0' id='x'/></message>"),
        format!("<message {NS} from='alice@example.org/a' to='{R}' type='groupchat'><subject>new subject</subject></message>"),
        format!("<message {NS} from='alice@example.org/a' to='{R}/Bob' type='chat'><body>pm</body></message>"),
        format!("<message {NS} from='bob@example.org/b' to='{R}/Alice' type='error'><error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>"),
        format!("<iq {NS} from='alice@example.org/a' to='{R}' type='set' id='q'><query xmlns='urn:xmpp:mam:2' queryid='f'><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE' type='hidden'><value>urn:xmpp:mam:2</value></field><field var='start'><value>2026-01-01T00:00:00Z</value></field><field var='with'><value>{R}/Bob</value></field><field var='ids'><value>a</value><value>b</value></field></x><set xmlns='http://jabber.org/protocol/rsm'><max>10</max><before/></set><flip-page/></query></iq>"),
        format!("<iq {NS} from='alice@example.org/a' to='{R}' type='get' id='d'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>"),
        format!("<iq {NS} from='alice@example.org/a' to='rooms.example.org' type='get' id='i'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>"),
        format!("<iq {NS} from='alice@example.org/a' to='{R}' type='set' id='adm'><query xmlns='http://jabber.org/protocol/muc#admin'><item affiliation='member' jid='carol@example.org'/></query></iq>"),
        format!("<iq {NS} from='alice@example.org/a' to='{R}' type='get' id='own'><query xmlns='http://jabber.org/protocol/muc#owner'/></iq>"),
        format!("<iq {NS} from='alice@example.org/a' to='{R}/Alice' type='get' id='p'><ping xmlns='urn:xmpp:ping'/></iq>"),
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let svc = std::cell::RefCell::new(service());
    let now =
        std::cell::Cell::new(chrono::DateTime::from_timestamp(1_800_000_000, 0).expect("time"));
    fuzz("stanzas", 70, &seeds, |input| {
        use caseroom::xmpp::link::guard::Guarded;
        use tokio_xmpp::xmlstream::{FallibleStreamElement, XmppStreamElement};
        let Ok(Guarded::Element(FallibleStreamElement::Ok(XmppStreamElement::Stanza(s)))) =
            xso::from_bytes::<Guarded>(input)
        else {
            return;
        };
        if let xmpp_parsers::stanza::Stanza::Message(m) = &s {
            // A message written without a tree is the same bytes as through one (or refused by
            // both: text or names rxml will not write).
            use caseroom::xmpp::{outbound::client_ns, wire};
            let tree = minidom::Element::from(m.clone());
            let via_tree = wire::Template::new(&tree).map(|t| t.copy_for("x@y/z"));
            let direct = wire::Template::of_message(m).map(|t| t.copy_for("x@y/z"));
            assert_eq!(direct.ok(), via_tree.ok(), "template of {m:?}");
            let mut no_to = m.clone();
            no_to.to = None;
            let via_tree = wire::encode(&client_ns(&minidom::Element::from(no_to))).ok();
            assert_eq!(wire::encode_forwarded(m).ok(), via_tree, "forwarded {m:?}");
        }
        now.set(now.get() + chrono::Duration::milliseconds(10));
        let effects = svc.borrow_mut().handle(s, now.get());
        // What the core sends goes through the link's serialiser next: it may refuse, never panic.
        let mut effects = effects;
        while let Some(e) = effects.pop() {
            match e {
                caseroom::muc::Effect::Send(st) => {
                    let _ = caseroom::xmpp::wire::encode(&minidom::Element::from(st));
                }
                caseroom::muc::Effect::Broadcast(b) => {
                    let to: Vec<String> = b.to.iter().map(|j| j.to_string()).collect();
                    let t = match b.what {
                        caseroom::muc::Shared::Message { template, .. } => Ok(template),
                        caseroom::muc::Shared::Stanza(s) => {
                            caseroom::xmpp::wire::Template::new(&minidom::Element::from(s))
                                .map(std::sync::Arc::new)
                        }
                    };
                    if let Ok(t) = t {
                        for j in &to {
                            let _ = t.copy_for(j);
                        }
                    }
                }
                caseroom::muc::Effect::ReplyPrepared(p) => {
                    let _ = p.bytes();
                }
                caseroom::muc::Effect::Archive(m) => {
                    effects.extend(svc.borrow_mut().archived(m));
                }
                _ => {}
            }
        }
    });
}
