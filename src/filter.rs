//! Room filters: which tracker events a room shows (config `[[room.filter]]`), in the spirit of
//! Zulip's and the GitHub Slack app's subscription filters ("no pushes except to main", "hide CI
//! success"). Pure.

use crate::activity::Activity;
use crate::config::{FilterConfig, FilterMode};

/// Does `value` satisfy `pattern` (`x` equal, case-insensitive; `!x` different)?
fn matches_one(pattern: &str, value: Option<&str>) -> bool {
    match pattern.strip_prefix('!') {
        Some(neg) => !value.is_some_and(|v| v.eq_ignore_ascii_case(neg)),
        None => value.is_some_and(|v| v.eq_ignore_ascii_case(pattern)),
    }
}

/// What filters look at, from an [`Activity`] (room filters, at routing) or from a message's XEP-0335
/// Activity JSON (per-person filters, at fan-out): one matcher for both.
#[derive(Debug, Default)]
pub struct Facts<'a> {
    /// Tracker name.
    pub tracker: Option<&'a str>,
    /// Event kind (`EventKind::as_str`).
    pub event: Option<&'a str>,
    /// Verb, first word ("commented on" → "commented").
    pub verb: Option<&'a str>,
    /// The tracker's action word.
    pub action: Option<&'a str>,
    /// Branch.
    pub branch: Option<&'a str>,
    /// Labels.
    pub labels: Vec<&'a str>,
}

fn first_word(s: &str) -> &str {
    s.split(' ').next().unwrap_or(s)
}

impl<'a> Facts<'a> {
    /// From an activity posted by `tracker`.
    pub fn of_activity(tracker: &'a str, a: &'a Activity) -> Facts<'a> {
        Facts {
            tracker: Some(tracker),
            event: Some(a.event.as_str()),
            verb: Some(first_word(a.verb.as_str())),
            action: Some(&a.action),
            branch: a.branch.as_deref(),
            labels: a.labels.iter().map(String::as_str).collect(),
        }
    }

    /// From the Activity JSON a message carries (`Activity::to_json`).
    pub fn of_json(v: &'a serde_json::Value) -> Facts<'a> {
        let s = |k: &str| v.get(k).and_then(serde_json::Value::as_str);
        Facts {
            tracker: s("caseroom:tracker"),
            event: s("caseroom:event"),
            verb: s("caseroom:verb").map(first_word),
            action: s("caseroom:action"),
            branch: s("caseroom:branch"),
            labels: v
                .get("caseroom:labels")
                .and_then(serde_json::Value::as_array)
                .map(|a| a.iter().filter_map(serde_json::Value::as_str).collect())
                .unwrap_or_default(),
        }
    }
}

/// Does one rule match? All fields the rule gives must match.
pub fn matches(rule: &FilterConfig, f: &Facts) -> bool {
    // Event names have aliases (pr, mr, pipeline…): compare canonical names, keeping a leading '!'.
    let event_ok = rule.event.as_deref().is_none_or(|e| {
        let (neg, name) = e.strip_prefix('!').map_or(("", e), |n| ("!", n));
        let canonical =
            crate::activity::EventKind::parse(&name.to_lowercase()).map_or(name, |k| k.as_str());
        matches_one(&format!("{neg}{canonical}"), f.event)
    });
    event_ok
        && rule.tracker.as_deref().is_none_or(|t| f.tracker == Some(t))
        && rule.verb.as_deref().is_none_or(|v| matches_one(v, f.verb))
        && rule
            .action
            .as_deref()
            .is_none_or(|x| matches_one(x, f.action))
        && rule
            .branch
            .as_deref()
            .is_none_or(|b| matches_one(b, f.branch))
        && rule
            .label
            .as_deref()
            .is_none_or(|l| match l.strip_prefix('!') {
                Some(neg) => !f.labels.iter().any(|x| x.eq_ignore_ascii_case(neg)),
                None => f.labels.iter().any(|x| x.eq_ignore_ascii_case(l)),
            })
}

/// A filter rule as people write it.
pub fn describe(rule: &FilterConfig) -> String {
    [
        ("event", &rule.event),
        ("verb", &rule.verb),
        ("action", &rule.action),
        ("label", &rule.label),
        ("branch", &rule.branch),
        ("tracker", &rule.tracker),
    ]
    .iter()
    .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
    .collect::<Vec<_>>()
    .join(" ")
}

/// Parse a `!mute` specification: `ci succeeded`, `event=push branch=!main`, `#wontfix`, `verb=closed`.
/// Bare words are an event kind or a verb; `#x` is a label.
pub fn parse_mute(spec: &str) -> Result<FilterConfig, String> {
    let mut rule = FilterConfig::default();
    for tok in spec.split_whitespace() {
        if let Some((k, v)) = tok.split_once('=') {
            let v = Some(v.to_owned());
            match k.to_lowercase().as_str() {
                "event" => rule.event = v,
                "verb" => rule.verb = v,
                "action" => rule.action = v,
                "label" => rule.label = v,
                "branch" => rule.branch = v,
                "tracker" => rule.tracker = v,
                other => return Err(format!("unknown filter field {other:?}: use event, verb, action, label, branch or tracker")),
            }
        } else if let Some(l) = tok.strip_prefix('#') {
            rule.label = Some(l.to_owned());
        } else if crate::activity::EventKind::parse(&tok.to_lowercase()).is_some() {
            rule.event = Some(tok.to_lowercase());
        } else if VERBS.contains(&tok.to_lowercase().as_str()) {
            rule.verb = Some(tok.to_lowercase());
        } else {
            return Err(format!(
                "{tok:?} is neither an event ({}) nor a verb ({}); write field=value",
                "issue, comment, push, pull_request, release, ci",
                VERBS.join(", ")
            ));
        }
    }
    if rule == FilterConfig::default() {
        return Err("say what to hide, e.g. `ci succeeded` or `event=push branch=!main`".into());
    }
    Ok(rule)
}

const VERBS: &[&str] = &[
    "opened",
    "closed",
    "reopened",
    "edited",
    "assigned",
    "labeled",
    "commented",
    "pushed",
    "merged",
    "released",
    "succeeded",
    "failed",
    "deleted",
];

/// Should a room with these rules show the event? Excludes win; include rules, if any, must match.
pub fn allows(rules: &[FilterConfig], tracker: &str, a: &Activity) -> bool {
    let facts = Facts::of_activity(tracker, a);
    if rules
        .iter()
        .any(|r| r.mode == FilterMode::Exclude && matches(r, &facts))
    {
        return false;
    }
    let mut includes = rules
        .iter()
        .filter(|r| r.mode == FilterMode::Include)
        .peekable();
    includes.peek().is_none() || includes.any(|r| matches(r, &facts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activity::{Actor, EventKind, Object, Verb};

    fn push(branch: &str) -> Activity {
        let mut a = Activity::new(
            Verb::Pushed,
            EventKind::Push,
            "branch",
            Actor::default(),
            Object::default(),
            "acme/web",
        );
        a.branch = Some(branch.into());
        a
    }

    fn rule(toml_text: &str) -> FilterConfig {
        toml::from_str(toml_text).expect("rule")
    }

    #[test]
    fn no_pushes_except_main_and_no_ci_success() {
        let rules = vec![
            rule("event = \"push\"\nbranch = \"!main\""),
            rule("event = \"ci\"\nverb = \"succeeded\""),
        ];
        assert!(allows(&rules, "forge", &push("main")));
        assert!(!allows(&rules, "forge", &push("feature/x")));
        let mut ci = Activity::new(
            Verb::Succeeded,
            EventKind::Ci,
            "success",
            Actor::default(),
            Object::default(),
            "acme/web",
        );
        assert!(!allows(&rules, "forge", &ci));
        ci.verb = Verb::Failed;
        assert!(allows(&rules, "forge", &ci));
    }

    #[test]
    fn mute_specs_and_json_matching() {
        let r = parse_mute("ci succeeded").expect("spec");
        assert_eq!(
            (r.event.as_deref(), r.verb.as_deref()),
            (Some("ci"), Some("succeeded"))
        );
        let r2 = parse_mute("event=push branch=!main #wontfix").expect("spec");
        assert_eq!(
            (r2.branch.as_deref(), r2.label.as_deref()),
            (Some("!main"), Some("wontfix"))
        );
        assert!(parse_mute("").is_err());
        assert!(parse_mute("colour=red")
            .unwrap_err()
            .contains("unknown filter field"));
        assert!(parse_mute("bananas")
            .unwrap_err()
            .contains("neither an event"));
        let mut ci = Activity::new(
            Verb::Succeeded,
            EventKind::Ci,
            "success",
            Actor::default(),
            Object::default(),
            "p",
        );
        ci.branch = Some("main".into());
        let json = ci.to_json("forge");
        assert!(matches(&r, &Facts::of_json(&json)));
        ci.verb = Verb::Failed;
        assert!(!matches(&r, &Facts::of_json(&ci.to_json("forge"))));
        assert!(
            !matches(&r2, &Facts::of_json(&push("main").to_json("forge"))),
            "main is not muted"
        );
        assert!(matches(
            &parse_mute("event=push branch=!main").expect("spec"),
            &Facts::of_json(&push("dev").to_json("forge"))
        ));
    }

    #[test]
    fn include_rules_and_labels() {
        let rules = vec![
            rule("mode = \"include\"\nlabel = \"security\""),
            rule("verb = \"commented\""),
        ];
        let mut a = Activity::new(
            Verb::Opened,
            EventKind::Issue,
            "opened",
            Actor::default(),
            Object::default(),
            "p",
        );
        assert!(!allows(&rules, "t", &a), "no security label");
        a.labels = vec!["Security".into()];
        assert!(allows(&rules, "t", &a));
        a.verb = Verb::Commented;
        assert!(!allows(&rules, "t", &a), "excluded although included");
        assert!(allows(&[], "t", &a), "no rules: everything shows");
    }
}
