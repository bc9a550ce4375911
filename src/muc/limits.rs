//! Per-person rate limits (token buckets), with time passed in like everything in the core.
//!
//! Anyone on the XMPP network can send stanzas, and every message with a body costs an archive
//! write and a fan-out, every MAM query a read. A person (bare JID) gets a bucket of `burst` tokens
//! refilled at `per_minute`; a stanza that finds it empty is refused with `policy-violation` and a text
//! saying when to try again (RFC 6120 §8.3.3.12; Prosody's muc_limits answers the same way). Buckets of
//! people who went quiet are dropped, so the map holds only recent senders.

use std::collections::HashMap;
use std::hash::Hash;

use chrono::{DateTime, Utc};
use xmpp_parsers::jid::BareJid;

/// A rate: `per_minute` on average, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Sustained stanzas per minute.
    pub per_minute: u32,
    /// Stanzas allowed at once after a quiet period.
    pub burst: u32,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: DateTime<Utc>,
}

/// Token buckets by key: a person's bare JID, or (room, person) for joins.
#[derive(Debug)]
pub struct Limiter<K = BareJid> {
    rate: Rate,
    buckets: HashMap<K, Bucket>,
    last_sweep: Option<DateTime<Utc>>,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    /// A limiter at `rate`.
    pub fn new(rate: Rate) -> Limiter<K> {
        Limiter {
            rate,
            buckets: HashMap::new(),
            last_sweep: None,
        }
    }

    fn per_sec(&self) -> f64 {
        f64::from(self.rate.per_minute.max(1)) / 60.0
    }

    /// Take a token for `who` at `now`: `Ok`, or `Err(seconds)` until the next token.
    pub fn take(&mut self, who: &K, now: DateTime<Utc>) -> Result<(), u64> {
        self.sweep(now);
        let burst = f64::from(self.rate.burst.max(1));
        let per_sec = self.per_sec();
        let b = self.buckets.entry(who.clone()).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        let elapsed = (now - b.last).num_milliseconds().max(0) as f64 / 1000.0;
        b.tokens = (b.tokens + elapsed * per_sec).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - b.tokens) / per_sec).ceil() as u64)
        }
    }

    /// Forget buckets that have refilled completely (their owners went quiet): at most once a
    /// minute. Run at each take and at the service's tick, so a service gone quiet lets go of them.
    pub fn sweep(&mut self, now: DateTime<Utc>) {
        if self
            .last_sweep
            .is_some_and(|t| (now - t).num_seconds() < 60)
        {
            return;
        }
        self.last_sweep = Some(now);
        let full_after = f64::from(self.rate.burst.max(1)) / self.per_sec();
        self.buckets
            .retain(|_, b| ((now - b.last).num_milliseconds() as f64 / 1000.0) < full_after);
    }

    /// People with a bucket (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + secs, 0)
            .single()
            .expect("time")
    }

    #[test]
    fn burst_then_the_sustained_rate() {
        let mut l = Limiter::new(Rate {
            per_minute: 60,
            burst: 5,
        });
        let eve: BareJid = "eve@evil.example".parse().expect("jid");
        let bob: BareJid = "bob@example.org".parse().expect("jid");
        for _ in 0..5 {
            assert_eq!(l.take(&eve, t(0)), Ok(()));
        }
        assert_eq!(l.take(&eve, t(0)), Err(1));
        // Others are not affected.
        assert_eq!(l.take(&bob, t(0)), Ok(()));
        // One per second comes back.
        assert_eq!(l.take(&eve, t(1)), Ok(()));
        assert_eq!(l.take(&eve, t(1)), Err(1));
        assert_eq!(l.take(&eve, t(3)), Ok(()));
        // A long pause refills up to the burst, not beyond.
        for _ in 0..5 {
            assert_eq!(l.take(&eve, t(1000)), Ok(()));
        }
        assert!(l.take(&eve, t(1000)).is_err());
    }

    #[test]
    fn quiet_people_are_forgotten() {
        let mut l = Limiter::new(Rate {
            per_minute: 60,
            burst: 5,
        });
        for i in 0..1000 {
            let j: BareJid = format!("u{i}@example.org").parse().expect("jid");
            let _ = l.take(&j, t(0));
        }
        assert_eq!(l.tracked(), 1000);
        let x: BareJid = "x@example.org".parse().expect("jid");
        let _ = l.take(&x, t(120));
        assert_eq!(l.tracked(), 1, "only the recent sender is kept");
    }
}
