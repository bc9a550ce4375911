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
