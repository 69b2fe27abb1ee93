//! Prometheus counters in the text exposition format: requests by endpoint and status, their
//! latency, tokens, and the engine's queue and batch.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use kaizen::serve::Stats;

/// Upper bounds (seconds) of the latency histogram's buckets.
const BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// One endpoint's latency histogram: bucket counts, sum of seconds, count.
type Histogram = ([u64; BUCKETS.len()], f64, u64);

#[derive(Default)]
pub struct Metrics {
    /// (endpoint, status) -> count
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    latency: Mutex<BTreeMap<&'static str, Histogram>>,
}

impl Metrics {
    pub fn request(&self, endpoint: &'static str, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((endpoint, status)).or_default() += 1;
        }
    }

    /// A finished request's time from arrival to its last byte.
    pub fn latency(&self, endpoint: &'static str, seconds: f64) {
        if let Ok(mut m) = self.latency.lock() {
            let e = m.entry(endpoint).or_default();
            for (b, le) in e.0.iter_mut().zip(BUCKETS) {
                if seconds <= le {
                    *b += 1;
                }
            }
            e.1 += seconds;
            e.2 += 1;
        }
    }

    pub fn render(&self, s: &Stats, in_flight: usize) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "# HELP kaizen_requests_total HTTP requests by endpoint and status.\n# TYPE kaizen_requests_total counter");
        if let Ok(m) = self.requests.lock() {
            for ((e, st), n) in m.iter() {
                let _ = writeln!(
                    o,
                    "kaizen_requests_total{{endpoint=\"{e}\",status=\"{st}\"}} {n}"
                );
            }
        }
        let _ = writeln!(o, "# HELP kaizen_request_duration_seconds Time from a generation request's arrival to its last byte.\n# TYPE kaizen_request_duration_seconds histogram");
        if let Ok(m) = self.latency.lock() {
            for (e, (b, sum, n)) in m.iter() {
                for (c, le) in b.iter().zip(BUCKETS) {
                    let _ = writeln!(o, "kaizen_request_duration_seconds_bucket{{endpoint=\"{e}\",le=\"{le}\"}} {c}");
                }
                let _ = writeln!(
                    o,
                    "kaizen_request_duration_seconds_bucket{{endpoint=\"{e}\",le=\"+Inf\"}} {n}"
                );
                let _ = writeln!(
                    o,
                    "kaizen_request_duration_seconds_sum{{endpoint=\"{e}\"}} {sum}"
                );
                let _ = writeln!(
                    o,
                    "kaizen_request_duration_seconds_count{{endpoint=\"{e}\"}} {n}"
                );
            }
        }
        let g = Stats::get;
        let secs = |us: u64| us as f64 / 1e6;
        for (name, kind, help, v) in [
            (
                "kaizen_prompt_tokens_total",
                "counter",
                "Prompt tokens prefilled.",
                g(&s.prompt_tokens).to_string(),
            ),
            (
                "kaizen_generation_tokens_total",
                "counter",
                "Tokens generated.",
                g(&s.generated_tokens).to_string(),
            ),
            (
                "kaizen_sequences_finished_total",
                "counter",
                "Sequences that ran to their end.",
                g(&s.requests_finished).to_string(),
            ),
            (
                "kaizen_running_sequences",
                "gauge",
                "Sequences in the decoding batch now.",
                g(&s.active_rows).to_string(),
            ),
            (
                "kaizen_waiting_sequences",
                "gauge",
                "Sequences waiting for a row.",
                g(&s.waiting).to_string(),
            ),
            (
                "kaizen_in_flight_sequences",
                "gauge",
                "Sequences admitted by HTTP and not yet answered (queued, waiting or running).",
                in_flight.to_string(),
            ),
            (
                "kaizen_decode_steps_total",
                "counter",
                "Batched decoding steps.",
                g(&s.decode_steps).to_string(),
            ),
            (
                "kaizen_decode_rows_total",
                "counter",
                "Rows over all decoding steps (mean batch = rows / steps).",
                g(&s.decode_rows).to_string(),
            ),
            (
                "kaizen_decode_seconds_total",
                "counter",
                "Time in decoding steps.",
                secs(g(&s.decode_seconds_micros)).to_string(),
            ),
            (
                "kaizen_prefill_seconds_total",
                "counter",
                "Time in prefills.",
                secs(g(&s.prefill_seconds_micros)).to_string(),
            ),
        ] {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        }
        o
    }
}
