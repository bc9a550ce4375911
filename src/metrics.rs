//! Prometheus metrics: `GET /metrics` in the OpenMetrics text format (which Prometheus reads).
//!
//! Two kinds of source, one registry:
//! - counters that `/healthz` and the Status command already show (the link's, the webhooks', the
//!   HTTP listener's) stay plain atomics where they are counted; a [`Collector`] reads them at
//!   scrape time, so nothing is counted twice;
//! - what has labels (tracker, outcome) or a distribution (latency) lives in [`Labelled`], updated
//!   where it happens: the HTTP handler, the bridge core, the job runner, the driver.
//!
//! Gauges that need a look at the store (inbox depth, age of the oldest pending delivery, whether
//! the store takes writes) are read by the `/metrics` handler just before encoding.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::http::HookCounters;
use crate::xmpp::link::LinkState;

/// `tracker` and `outcome` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByTracker {
    /// Tracker name from the config.
    pub tracker: String,
    /// What happened.
    pub outcome: String,
}

/// `tracker` and `job` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByJob {
    /// Tracker name from the config.
    pub tracker: String,
    /// command, vocabulary, create, whoami.
    pub job: String,
}

/// `tracker`, `job` and `outcome` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByJobOutcome {
    /// Tracker name from the config.
    pub tracker: String,
    /// command, vocabulary, create, whoami.
    pub job: String,
    /// ok, failed (the tracker refused or erred; the person was told why), timeout.
    pub outcome: String,
}

type Buckets = fn() -> Histogram;

/// 1 ms to 16 s, doubling.
fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// 50 µs to 0.8 s, doubling: archive queries.
fn query_seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 15))
}

/// Counters with labels and latency histograms (shared; clones count into the same metrics).
#[derive(Clone, Debug)]
pub struct Labelled {
    /// Webhook requests by tracker and outcome (accepted, duplicate, unauthorized, rejected,
    /// timed_out, unavailable, ping).
    pub webhooks: Family<ByTracker, Counter>,
    /// What became of accepted deliveries, by tracker: posted, ignored, unknown, failed.
    pub events: Family<ByTracker, Counter>,
    /// Tracker calls made for people (chat commands, forms), by tracker, job and outcome.
    pub jobs: Family<ByJobOutcome, Counter>,
    /// Their duration.
    pub job_seconds: Family<ByJob, Histogram, Buckets>,
    /// Tracker sync runs by tracker and outcome (ok, failed).
    pub syncs: Family<ByTracker, Counter>,
    /// Archive (MAM) query time on the store's reader thread.
    pub mam_seconds: Histogram,
    /// Rooms the service has.
    pub rooms: Gauge,
    /// Occupants (nicks) in all rooms.
    pub occupants: Gauge,
}

impl Default for Labelled {
    fn default() -> Self {
        Labelled {
            webhooks: Family::default(),
            events: Family::default(),
            jobs: Family::default(),
            job_seconds: Family::new_with_constructor(seconds as Buckets),
            syncs: Family::default(),
            mam_seconds: query_seconds(),
            rooms: Gauge::default(),
            occupants: Gauge::default(),
        }
    }
}

impl Labelled {
    /// Count a webhook request.
    pub fn webhook(&self, tracker: &str, outcome: &str) {
        self.webhooks.get_or_create(&by(tracker, outcome)).inc();
    }

    /// Count what became of an accepted delivery.
    pub fn event(&self, tracker: &str, outcome: &str) {
        self.events.get_or_create(&by(tracker, outcome)).inc();
    }

    /// Count a tracker job and its duration.
    pub fn job(&self, tracker: &str, job: &str, outcome: &str, seconds: f64) {
        self.jobs
            .get_or_create(&ByJobOutcome {
                tracker: tracker.to_owned(),
                job: job.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
        self.job_seconds
            .get_or_create(&ByJob {
                tracker: tracker.to_owned(),
                job: job.to_owned(),
            })
            .observe(seconds);
    }

    /// Time an archive query took on the store's reader thread.
    pub fn mam_query(&self, took: std::time::Duration) {
        self.mam_seconds.observe(took.as_secs_f64());
    }

    /// Rooms and occupants now.
    pub fn population(&self, rooms: usize, occupants: usize) {
        self.rooms.set(rooms as i64);
        self.occupants.set(occupants as i64);
    }

    /// Count a sync run.
    pub fn sync(&self, tracker: &str, outcome: &str) {
        self.syncs.get_or_create(&by(tracker, outcome)).inc();
    }
}

fn by(tracker: &str, outcome: &str) -> ByTracker {
    ByTracker {
        tracker: tracker.to_owned(),
        outcome: outcome.to_owned(),
    }
}

/// What the `/metrics` handler learns from the store just before encoding.
#[derive(Debug, Clone, Default)]
pub struct StoreGauges {
    /// Deliveries accepted and not yet handled.
    pub pending: Gauge,
    /// Age (s) of the oldest of them; 0 when none.
    pub oldest_pending_seconds: Gauge,
    /// 1 when the store's writer committed a probe just now, 0 otherwise.
    pub writable: Gauge,
}

/// The registry and the sources it reads.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Set by the `/metrics` handler before encoding.
    pub store: StoreGauges,
}

impl Metrics {
    /// Register everything under `caseroom_`.
    pub fn new(link: Arc<LinkState>, hooks: Arc<HookCounters>) -> Metrics {
        let mut r = Registry::with_prefix("caseroom");
        let l = &hooks.labelled;
        r.register(
            "webhooks",
            "Webhook requests by tracker and outcome",
            l.webhooks.clone(),
        );
        r.register(
            "events",
            "Accepted deliveries by tracker and what became of them",
            l.events.clone(),
        );
        r.register(
            "tracker_jobs",
            "Tracker calls made for people (commands, forms) by tracker, job and outcome",
            l.jobs.clone(),
        );
        r.register(
            "tracker_job_seconds",
            "Duration of tracker calls made for people",
            l.job_seconds.clone(),
        );
        r.register(
            "tracker_syncs",
            "Tracker sync runs (groups, members, roles) by outcome",
            l.syncs.clone(),
        );
        r.register(
            "mam_query_seconds",
            "Archive query time on the store's reader thread",
            l.mam_seconds.clone(),
        );
        r.register("rooms", "Rooms the service has", l.rooms.clone());
        r.register(
            "occupants",
            "Occupants (nicks) in all rooms",
            l.occupants.clone(),
        );
        let store = StoreGauges::default();
        r.register(
            "inbox_pending",
            "Webhook deliveries accepted and not yet handled",
            store.pending.clone(),
        );
        r.register(
            "inbox_oldest_pending_seconds",
            "Age of the oldest delivery not yet handled (0 when none)",
            store.oldest_pending_seconds.clone(),
        );
        r.register(
            "store_writable",
            "1 when the store committed a probe write for this scrape",
            store.writable.clone(),
        );
        r.register_collector(Box::new(Atomics { link, hooks }));
        Metrics { registry: r, store }
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Reads the plain atomics at scrape time.
#[derive(Debug)]
struct Atomics {
    link: Arc<LinkState>,
    hooks: Arc<HookCounters>,
}

impl Collector for Atomics {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let link = &self.link;
        let h = &self.hooks;
        let counters: [(&str, &str, u64); 10] = [
            (
                "link_relinks",
                "Times a component connection came back after a loss",
                n(&link.relinks),
            ),
            (
                "link_misrouted",
                "Stanzas for one room that came over another component connection than the room's earlier ones (the server does not balance by bare destination)",
                n(&link.misrouted),
            ),
            (
                "link_dropped",
                "Stanzas dropped because the outgoing queue was full",
                n(&link.dropped),
            ),
            (
                "stanzas_in",
                "Stanzas received from the server",
                n(&link.stanzas_in),
            ),
            (
                "stanzas_out",
                "Stanzas written to the server (one per recipient)",
                n(&link.stanzas_out),
            ),
            (
                "stanzas_skipped_departed",
                "Queued room stanzas not sent because their recipient had left the room",
                n(&link.skipped_departed),
            ),
            (
                "stanzas_malformed",
                "Malformed stanzas answered with bad-request",
                n(&link.malformed),
            ),
            (
                "stanzas_refused",
                "Stanzas refused for depth or size (policy-violation)",
                n(&link.refused),
            ),
            (
                "http_connections_refused",
                "HTTP connections closed at once (http.max_connections)",
                n(&h.connections_refused),
            ),
            (
                "webhook_bodies_timed_out",
                "Webhook bodies not received within http.body_timeout",
                n(&h.timed_out),
            ),
        ];
        for (name, help, v) in counters {
            let c = ConstCounter::new(v);
            c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let gauges: [(&str, &str, i64); 4] = [
            (
                "link_up",
                "1 when every component connection is up",
                i64::from(link.is_up()),
            ),
            (
                "link_connections_up",
                "Component connections up (of component.connections)",
                n(&link.links_up) as i64,
            ),
            (
                "link_queued",
                "Stanzas waiting to be written to the server",
                n(&link.queued) as i64,
            ),
            (
                "http_connections",
                "HTTP connections open",
                n(&h.connections) as i64,
            ),
        ];
        for (name, help, v) in gauges {
            let g = ConstGauge::new(v);
            g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        Ok(())
    }
}
