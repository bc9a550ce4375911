//! Case references typed in a tracker room (`#123`, or a link to one of the room's cases): the bot
//! answers each with a one-line summary (title, state, assignee, link) in the thread. Pure: which
//! numbers a message refers to, and whether one was summarised lately.
//!
//! Only a room's own project is looked at: a link to another project's case is not summarised, as
//! the room's members may not be allowed to see that project.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};

/// Case numbers are at most this many digits (anything longer is not a case number).
const MAX_DIGITS: usize = 9;
/// Summaries remembered at most; older ones are forgotten first.
const REMEMBERED: usize = 10_000;

/// The case numbers `body` refers to, in order, each once, at most `max`: `#N` standing alone (not
/// inside a word or a URL, e.g. `abc#1` or `…/page#12`), and links starting with one of `prefixes`
/// followed by the number (`https://forge.example.org/acme/web/issues/12`).
pub fn referenced(body: &str, prefixes: &[String], max: usize) -> Vec<u64> {
    let mut found: Vec<(usize, u64)> = Vec::new();
    for (at, _) in body.match_indices('#') {
        let before = body[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || "/&#_-".contains(c)) {
            continue;
        }
        if let Some(n) = number_at(&body[at + 1..]) {
            found.push((at, n));
        }
    }
    for p in prefixes.iter().filter(|p| !p.is_empty()) {
        for (at, _) in body.match_indices(p.as_str()) {
            if let Some(n) = number_at(&body[at + p.len()..]) {
                found.push((at, n));
            }
        }
    }
    found.sort_by_key(|(at, _)| *at);
    let mut out: Vec<u64> = Vec::new();
    for (_, n) in found {
        if out.len() < max && !out.contains(&n) {
            out.push(n);
        }
    }
    out
}

/// The number at the start of `s`, if it ends there (`12`, `12.`, `12)`; not `12abc` or `1.5`).
fn number_at(s: &str) -> Option<u64> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || digits > MAX_DIGITS {
        return None;
    }
    let rest = &s[digits..];
    let next = rest.chars().next();
    let ends = match next {
        None => true,
        Some(c) if c.is_alphanumeric() || c == '_' => false,
        // "see #12." ends the number; "1.5" does not.
        Some('.' | ',') => !rest[1..].starts_with(|c: char| c.is_ascii_digit()),
        Some(_) => true,
    };
    if !ends {
        return None;
    }
    s[..digits].parse().ok().filter(|n| *n > 0)
}

/// When each (room, case) was last summarised: a case is summarised again in a room only after
/// `quiet` has passed.
#[derive(Debug, Default)]
pub struct Recent(HashMap<(String, u64), DateTime<Utc>>);

impl Recent {
    /// Of `numbers`, those not summarised in `room` within `quiet` of `now`; they count as
    /// summarised from now.
    pub fn take(
        &mut self,
        room: &str,
        numbers: Vec<u64>,
        now: DateTime<Utc>,
        quiet: Duration,
    ) -> Vec<u64> {
        if self.0.len() >= REMEMBERED {
            self.0.retain(|_, at| now - *at < quiet);
            if self.0.len() >= REMEMBERED {
                // Still full of fresh entries: forget the oldest half.
                let mut times: Vec<DateTime<Utc>> = self.0.values().copied().collect();
                times.sort();
                let cut = times[times.len() / 2];
                self.0.retain(|_, at| *at > cut);
            }
        }
        numbers
            .into_iter()
            .filter(|n| {
                let key = (room.to_owned(), *n);
                let fresh = self.0.get(&key).is_some_and(|at| now - *at < quiet);
                if !fresh {
                    self.0.insert(key, now);
                }
                !fresh
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_numbers_and_links_to_the_rooms_project_are_references() {
        let p = vec!["https://forge.example.org/acme/web/issues/".to_owned()];
        assert_eq!(referenced("see #12 and #7.", &p, 3), vec![12, 7]);
        assert_eq!(
            referenced(
                "(#3) https://forge.example.org/acme/web/issues/45, #3 again",
                &p,
                3
            ),
            vec![3, 45]
        );
        // At most `max`, in order of appearance.
        assert_eq!(referenced("#1 #2 #3 #4", &p, 3), vec![1, 2, 3]);
        // Not references: inside words or URLs, other projects, versions, huge or zero numbers.
        for body in [
            "abc#1",
            "https://example.org/page#12",
            "https://forge.example.org/acme/other/issues/9",
            "#1.5 is out",
            "#12abc",
            "#1234567890",
            "#0",
            "C# is fine",
            "##",
        ] {
            assert!(referenced(body, &p, 3).is_empty(), "{body}");
        }
    }

    #[test]
    fn a_case_is_summarised_again_only_after_the_quiet_time() {
        let mut r = Recent::default();
        let t0 = DateTime::<Utc>::from_timestamp(1_700_000_000, 0).expect("time");
        let q = Duration::minutes(30);
        assert_eq!(r.take("web", vec![1, 2], t0, q), vec![1, 2]);
        assert_eq!(
            r.take("web", vec![1, 3], t0 + Duration::minutes(5), q),
            vec![3]
        );
        assert_eq!(
            r.take("ops", vec![1], t0 + Duration::minutes(5), q),
            vec![1]
        );
        assert_eq!(
            r.take("web", vec![1], t0 + Duration::minutes(31), q),
            vec![1]
        );
    }
}
