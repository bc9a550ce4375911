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

/// Does one rule match the event from `tracker`?
pub fn rule_matches(rule: &FilterConfig, tracker: &str, a: &Activity) -> bool {
    let verb = a.verb.as_str().split(' ').next().unwrap_or(""); // "commented on" → "commented"
    rule.tracker.as_deref().is_none_or(|t| t == tracker)
        && rule.event.as_deref().is_none_or(|e| {
            matches_one(e, Some(a.event.as_str()))
                || crate::activity::EventKind::parse(e) == Some(a.event)
        })
        && rule
            .verb
            .as_deref()
            .is_none_or(|v| matches_one(v, Some(verb)))
        && rule
            .action
            .as_deref()
            .is_none_or(|x| matches_one(x, Some(&a.action)))
        && rule
            .branch
            .as_deref()
            .is_none_or(|b| matches_one(b, a.branch.as_deref()))
        && rule
            .label
            .as_deref()
            .is_none_or(|l| match l.strip_prefix('!') {
                Some(neg) => !a.labels.iter().any(|x| x.eq_ignore_ascii_case(neg)),
                None => a.labels.iter().any(|x| x.eq_ignore_ascii_case(l)),
            })
}

/// Does one rule match an event as carried in a message's XEP-0335 payload (the Activity JSON)?
/// Per-person filters (`!mute`) are applied to messages, where only this form is at hand.
pub fn rule_matches_json(rule: &FilterConfig, v: &serde_json::Value) -> bool {
    let s = |k: &str| v.get(k).and_then(serde_json::Value::as_str);
    let verb = s("caseroom:verb").map(|x| x.split(' ').next().unwrap_or(x));
    let labels: Vec<&str> = v
        .get("caseroom:labels")
        .and_then(serde_json::Value::as_array)
        .map(|a| a.iter().filter_map(serde_json::Value::as_str).collect())
        .unwrap_or_default();
    rule.tracker
        .as_deref()
        .is_none_or(|t| s("caseroom:tracker") == Some(t))
        && rule.event.as_deref().is_none_or(|e| {
            let want = crate::activity::EventKind::parse(e.trim_start_matches('!'))
                .map(|k| k.as_str())
                .unwrap_or(e);
            let pattern = if e.starts_with('!') {
                format!("!{want}")
            } else {
                want.to_owned()
            };
            matches_one(&pattern, s("caseroom:event"))
        })
        && rule.verb.as_deref().is_none_or(|x| matches_one(x, verb))
        && rule
            .action
            .as_deref()
            .is_none_or(|x| matches_one(x, s("caseroom:action")))
        && rule
            .branch
            .as_deref()
            .is_none_or(|b| matches_one(b, s("caseroom:branch")))
        && rule
            .label
            .as_deref()
            .is_none_or(|l| match l.strip_prefix('!') {
                Some(neg) => !labels.iter().any(|x| x.eq_ignore_ascii_case(neg)),
                None => labels.iter().any(|x| x.eq_ignore_ascii_case(l)),
            })
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
    if rules
        .iter()
        .any(|r| r.mode == FilterMode::Exclude && rule_matches(r, tracker, a))
    {
        return false;
    }
    let mut includes = rules
        .iter()
        .filter(|r| r.mode == FilterMode::Include)
        .peekable();
    includes.peek().is_none() || includes.any(|r| rule_matches(r, tracker, a))
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
        assert!(rule_matches_json(&r, &json));
        ci.verb = Verb::Failed;
        assert!(!rule_matches_json(&r, &ci.to_json("forge")));
        assert!(
            !rule_matches_json(&r2, &push("main").to_json("forge")),
            "main is not muted"
        );
        assert!(rule_matches_json(
            &parse_mute("event=push branch=!main").expect("spec"),
            &push("dev").to_json("forge")
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
