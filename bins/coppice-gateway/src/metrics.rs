//! The gateway's own numbers, for Prometheus: lifecycle counters, request latency per route
//! family, proxy bytes. [`Metrics`] holds them as lock-free atomics; [`Exposition`] writes the
//! text exposition format (version 0.0.4) that `GET /metrics` serves. `docs/metrics.md` lists
//! every series.
//!
//! Each counter is bumped in exactly one place: lifecycle counters by `Gateway::commit` (and
//! the restart sweep that records a dead sandbox's `killed`), request timings by the router,
//! bytes by the proxy's bodies. Gauges (sandboxes running and paused, the webhook outbox,
//! admission's capacity and host memory) and the webhook dispatcher's and admission's own
//! counters are read when scraped.

use std::fmt::Write as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Buf;
use coppice_lifecycle::state::{Cause, LifecycleEvent};
use http::StatusCode;
use http_body::{Body, Frame, SizeHint};

/// The content type of the text exposition format.
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds of the request latency buckets, in seconds (`+Inf` is implied).
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// What a request was for, as the latency series label it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    /// `/sandboxes…` and `/v2/sandboxes…`.
    Sandboxes,
    /// `/events/sandboxes…`.
    Events,
    /// `/events/webhooks…`.
    Webhooks,
    /// Data plane, envd's port (49983).
    ProxyEnvd,
    /// Data plane, the code interpreter's port (49999).
    ProxyCode,
    /// Data plane, any other port.
    ProxyOther,
    /// `/health`.
    Health,
    /// `/metrics`.
    Metrics,
    /// Anything else (answered 404 or 405).
    Other,
}

impl Family {
    const ALL: [Family; 9] = [
        Family::Sandboxes,
        Family::Events,
        Family::Webhooks,
        Family::ProxyEnvd,
        Family::ProxyCode,
        Family::ProxyOther,
        Family::Health,
        Family::Metrics,
        Family::Other,
    ];

    fn label(self) -> &'static str {
        match self {
            Family::Sandboxes => "sandboxes",
            Family::Events => "events",
            Family::Webhooks => "webhooks",
            Family::ProxyEnvd => "proxy_envd",
            Family::ProxyCode => "proxy_code",
            Family::ProxyOther => "proxy_other",
            Family::Health => "health",
            Family::Metrics => "metrics",
            Family::Other => "other",
        }
    }

    /// The family of a data-plane request to `port`.
    pub(crate) fn proxy(port: u16) -> Self {
        match port {
            49983 => Family::ProxyEnvd,
            49999 => Family::ProxyCode,
            _ => Family::ProxyOther,
        }
    }

    /// The family of a control-plane request for `path`.
    pub(crate) fn control(path: &str) -> Self {
        let mut segments = path.trim_matches('/').split('/');
        match (segments.next(), segments.next()) {
            (Some("sandboxes"), _) | (Some("v2"), Some("sandboxes")) => Family::Sandboxes,
            (Some("events"), Some("sandboxes")) => Family::Events,
            (Some("events"), Some("webhooks")) => Family::Webhooks,
            (Some("health"), None) => Family::Health,
            (Some("metrics"), None) => Family::Metrics,
            _ => Family::Other,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Status classes counted per family.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Causes, in the order the per-cause counters are kept.
const CAUSES: [Cause; 5] = [
    Cause::Manual,
    Cause::Timeout,
    Cause::Connect,
    Cause::AutoResume,
    Cause::Failure,
];

fn cause_index(cause: Cause) -> usize {
    CAUSES.iter().position(|c| *c == cause).unwrap_or(0)
}

fn cause_label(cause: Cause) -> &'static str {
    match cause {
        Cause::Manual => "manual",
        Cause::Timeout => "timeout",
        Cause::Connect => "connect",
        Cause::AutoResume => "auto",
        Cause::Failure => "failure",
    }
}

/// A latency histogram whose buckets are plain atomics.
#[derive(Debug, Default)]
struct Histogram {
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    /// Sum of the observations, in nanoseconds.
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|le| secs <= *le)
            .unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

/// Every counter the gateway keeps.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    created: AtomicU64,
    paused: [AtomicU64; CAUSES.len()],
    resumed: [AtomicU64; CAUSES.len()],
    killed: [AtomicU64; CAUSES.len()],
    latency: [Histogram; Family::ALL.len()],
    responses: [[AtomicU64; CLASSES.len()]; Family::ALL.len()],
    /// Proxied body bytes: client → sandbox, sandbox → client.
    proxy_in: Arc<AtomicU64>,
    proxy_out: Arc<AtomicU64>,
    /// Reports of blocked egress recorded as `security.violation`.
    egress_blocked: AtomicU64,
}

/// One warm pool's figures besides its ready sandboxes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PoolLevel {
    /// Its target.
    pub(crate) target: u64,
    /// Creates that took a warm sandbox.
    pub(crate) hits: u64,
    /// Creates that found it empty.
    pub(crate) misses: u64,
}

/// What is read when scraped rather than counted.
#[derive(Debug, Clone, Default)]
pub(crate) struct Levels {
    /// Sandboxes running now.
    pub(crate) running: u64,
    /// Sandboxes paused now.
    pub(crate) paused: u64,
    /// Warm sandboxes waiting to be claimed, per template.
    pub(crate) warm: Vec<(&'static str, u64)>,
    /// Each pool's target, hits and misses (`GET /pool`), per template.
    pub(crate) pools: Vec<(&'static str, PoolLevel)>,
    /// The webhook outbox, if the store could be read.
    pub(crate) outbox: Option<coppice_events::store::DeliveryStats>,
    /// The webhook dispatcher's counters.
    pub(crate) dispatch: coppice_events::dispatch::DispatchStats,
    /// Admission's places and host memory.
    pub(crate) capacity: crate::admission::Capacity,
    /// Admission's refused creates.
    pub(crate) refused: crate::admission::Refused,
}

impl Metrics {
    /// Counts a lifecycle event the gateway recorded.
    pub(crate) fn lifecycle(&self, event: &LifecycleEvent) {
        let counter = match event {
            LifecycleEvent::Created => &self.created,
            LifecycleEvent::Paused { cause } => &self.paused[cause_index(*cause)],
            LifecycleEvent::Resumed { cause } => &self.resumed[cause_index(*cause)],
            LifecycleEvent::Killed { cause } => &self.killed[cause_index(*cause)],
            LifecycleEvent::Updated { .. } => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts `n` reports of blocked egress recorded as events.
    pub(crate) fn egress_blocked(&self, n: usize) {
        self.egress_blocked
            .fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Records one request: how long until its response head, and the response's status.
    pub(crate) fn request(&self, family: Family, status: StatusCode, took: Duration) {
        let f = family.index();
        self.latency[f].observe(took);
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.responses[f][class].fetch_add(1, Ordering::Relaxed);
    }

    /// `body`, counting its bytes as proxied into a sandbox.
    pub(crate) fn count_in<B>(&self, body: B) -> Counted<B> {
        Counted {
            inner: body,
            bytes: Arc::clone(&self.proxy_in),
        }
    }

    /// `body`, counting its bytes as proxied out of a sandbox.
    pub(crate) fn count_out<B>(&self, body: B) -> Counted<B> {
        Counted {
            inner: body,
            bytes: Arc::clone(&self.proxy_out),
        }
    }

    /// The exposition of every series, with `levels` for the gauges.
    pub(crate) fn render(&self, levels: &Levels) -> String {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = Exposition::default();
        out.family(
            "coppice_sandboxes_created_total",
            "counter",
            "Sandboxes created.",
        );
        out.sample("coppice_sandboxes_created_total", &[], load(&self.created));
        out.family(
            "coppice_egress_blocked_total",
            "counter",
            "Blocked egress attempts recorded as security.violation (a rate-limited sample).",
        );
        out.sample(
            "coppice_egress_blocked_total",
            &[],
            load(&self.egress_blocked),
        );
        // Each counter shows the causes it can have, and any other that somehow occurred.
        let per_cause = |out: &mut Exposition,
                         name: &str,
                         help: &str,
                         label: &str,
                         counters: &[AtomicU64; CAUSES.len()],
                         expected: &[Cause]| {
            out.family(name, "counter", help);
            for (i, cause) in CAUSES.iter().enumerate() {
                let n = load(&counters[i]);
                if expected.contains(cause) || n > 0 {
                    out.sample(name, &[(label, cause_label(*cause))], n);
                }
            }
        };
        per_cause(
            &mut out,
            "coppice_sandboxes_paused_total",
            "Sandboxes paused, by cause (an API call, or the end of an auto-pause window).",
            "cause",
            &self.paused,
            &[Cause::Manual, Cause::Timeout],
        );
        per_cause(
            &mut out,
            "coppice_sandboxes_resumed_total",
            "Paused sandboxes resumed, by what resumed them (resume call, connect, traffic).",
            "via",
            &self.resumed,
            &[Cause::Manual, Cause::Connect, Cause::AutoResume],
        );
        per_cause(
            &mut out,
            "coppice_sandboxes_killed_total",
            "Sandboxes killed, by cause (an API call, the end of the window, found dead).",
            "cause",
            &self.killed,
            &[Cause::Manual, Cause::Timeout, Cause::Failure],
        );
        out.family(
            "coppice_sandboxes_running",
            "gauge",
            "Sandboxes running now.",
        );
        out.sample("coppice_sandboxes_running", &[], levels.running);
        out.family("coppice_sandboxes_paused", "gauge", "Sandboxes paused now.");
        out.sample("coppice_sandboxes_paused", &[], levels.paused);
        out.family(
            "coppice_warm_sandboxes",
            "gauge",
            "Sandboxes started ahead of creates (--warm-pool), per template.",
        );
        for (template, n) in &levels.warm {
            out.sample("coppice_warm_sandboxes", &[("template", template)], *n);
        }
        // Name, type, help, and which figure of a pool.
        type Series = (
            &'static str,
            &'static str,
            &'static str,
            fn(&PoolLevel) -> u64,
        );
        let pool_series: [Series; 3] = [
            (
                "coppice_warm_pool_target",
                "gauge",
                "Warm sandboxes each pool is kept at (--warm-pool or POST /pool/{template}/warm), per template.",
                |p| p.target,
            ),
            (
                "coppice_warm_pool_hits_total",
                "counter",
                "Creates that took a warm sandbox, per template.",
                |p| p.hits,
            ),
            (
                "coppice_warm_pool_misses_total",
                "counter",
                "Creates that found their template's pool empty, per template.",
                |p| p.misses,
            ),
        ];
        for (name, kind, help, value) in pool_series {
            out.family(name, kind, help);
            for (template, p) in &levels.pools {
                out.sample(name, &[("template", template)], value(p));
            }
        }
        let c = &levels.capacity;
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        for (name, help, value) in [
            (
                "coppice_sandboxes_capacity",
                "Most sandboxes at once (--max-sandboxes), warm ones and starts included.",
                count(c.max_sandboxes),
            ),
            (
                "coppice_sandboxes_used",
                "Places taken under --max-sandboxes: running, paused, warm, and starts under way.",
                count(c.used),
            ),
            (
                "coppice_sandboxes_free",
                "Places left under --max-sandboxes.",
                count(c.free),
            ),
            (
                "coppice_host_memory_floor_bytes",
                "Host memory no sandbox start may take (--min-free-memory).",
                c.min_free_memory_bytes,
            ),
        ] {
            out.family(name, "gauge", help);
            out.sample(name, &[], value);
        }
        if let Some(available) = c.mem_available_bytes {
            let name = "coppice_host_memory_available_bytes";
            out.family(
                name,
                "gauge",
                "The host's available memory (MemAvailable), read at the scrape.",
            );
            out.sample(name, &[], available);
        }
        let name = "coppice_creates_refused_total";
        out.family(
            name,
            "counter",
            "Creates answered 429, by the limit they hit: --max-sandboxes or --min-free-memory.",
        );
        out.sample(
            name,
            &[("reason", "max_sandboxes")],
            levels.refused.max_sandboxes,
        );
        out.sample(name, &[("reason", "memory")], levels.refused.memory);

        let name = "coppice_http_request_duration_seconds";
        out.family(
            name,
            "histogram",
            "Time from a request's arrival to its response head, by route family.",
        );
        for family in Family::ALL {
            let h = &self.latency[family.index()];
            let f = family.label();
            let mut cumulative = 0u64;
            for (i, le) in BUCKETS.iter().enumerate() {
                cumulative += load(&h.buckets[i]);
                out.sample(
                    &format!("{name}_bucket"),
                    &[("family", f), ("le", &format_float(*le))],
                    cumulative,
                );
            }
            cumulative += load(&h.buckets[BUCKETS.len()]);
            out.sample(
                &format!("{name}_bucket"),
                &[("family", f), ("le", "+Inf")],
                cumulative,
            );
            #[allow(
                clippy::cast_precision_loss,
                reason = "a sum of seconds needs no more than f64's precision"
            )]
            let sum = load(&h.sum_nanos) as f64 / 1e9;
            out.sample_float(&format!("{name}_sum"), &[("family", f)], sum);
            out.sample(&format!("{name}_count"), &[("family", f)], cumulative);
        }
        let name = "coppice_http_responses_total";
        out.family(
            name,
            "counter",
            "Responses by route family and status class.",
        );
        for family in Family::ALL {
            for (i, class) in CLASSES.iter().enumerate() {
                let n = load(&self.responses[family.index()][i]);
                out.sample(name, &[("family", family.label()), ("code", class)], n);
            }
        }
        let name = "coppice_proxy_bytes_total";
        out.family(
            name,
            "counter",
            "Body bytes proxied to sandboxes (in) and from them (out).",
        );
        out.sample(name, &[("direction", "in")], load(&self.proxy_in));
        out.sample(name, &[("direction", "out")], load(&self.proxy_out));

        let d = &levels.dispatch;
        let name = "coppice_webhook_attempts_total";
        out.family(
            name,
            "counter",
            "Webhook delivery attempts by outcome: accepted, to be retried, given up, or \
             answered 410 (which disables the webhook).",
        );
        for (outcome, n) in [
            ("delivered", d.delivered),
            ("retrying", d.retrying),
            ("failed", d.failed),
            ("disabled", d.disabled),
        ] {
            out.sample(name, &[("outcome", outcome)], n);
        }
        let name = "coppice_webhook_connections_total";
        out.family(
            name,
            "counter",
            "Connections the webhook dispatcher opened (kept alive between attempts).",
        );
        out.sample(name, &[], d.connections);
        if let Some(w) = levels.outbox {
            let name = "coppice_webhook_outbox";
            out.family(
                name,
                "gauge",
                "Webhook deliveries in the outbox by state, among those retention keeps.",
            );
            for (state, n) in [
                ("pending", w.pending),
                ("delivered", w.delivered),
                ("failed", w.failed),
            ] {
                out.sample(name, &[("state", state)], n);
            }
        }
        out.text
    }
}

/// A body that adds the size of every data frame it passes to a counter.
#[derive(Debug)]
pub(crate) struct Counted<B> {
    inner: B,
    bytes: Arc<AtomicU64>,
}

impl<B> Body for Counted<B>
where
    B: Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                let n = u64::try_from(data.remaining()).unwrap_or(u64::MAX);
                self.bytes.fetch_add(n, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A number as the exposition format writes it.
fn format_float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        // Rust never writes an exponent here, and the format accepts plain decimals.
        format!("{v}")
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// HELP text with `\` and newlines escaped.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// The text exposition format, written series by series.
#[derive(Debug, Default)]
pub(crate) struct Exposition {
    text: String,
}

impl Exposition {
    /// Starts a metric family: its HELP and TYPE lines.
    pub(crate) fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn labels(&mut self, name: &str, labels: &[(&str, &str)]) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"{}\"", escape_label(v));
            }
            self.text.push('}');
        }
    }

    /// One sample with an integer value.
    pub(crate) fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.labels(name, labels);
        let _ = writeln!(self.text, " {value}");
    }

    /// One sample with a float value.
    pub(crate) fn sample_float(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.labels(name, labels);
        let _ = writeln!(self.text, " {}", format_float(value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The samples of `text` as (name with labels, value), checking every line's shape: a
    /// comment is `# HELP name text` or `# TYPE name kind`, a TYPE comes before any sample of
    /// its family, and a sample is `name{k="v",...} value`.
    fn samples(text: &str) -> Vec<(String, String)> {
        let mut typed: Vec<String> = Vec::new();
        let mut out = Vec::new();
        assert!(text.ends_with('\n'), "the exposition ends with a newline");
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# ") {
                let mut parts = rest.splitn(3, ' ');
                let (kw, name, tail) = (parts.next(), parts.next(), parts.next());
                let (Some(kw), Some(name), Some(tail)) = (kw, name, tail) else {
                    panic!("malformed comment {line:?}");
                };
                match kw {
                    "HELP" => assert!(!tail.contains('\n')),
                    "TYPE" => {
                        assert!(
                            ["counter", "gauge", "histogram"].contains(&tail),
                            "{line:?}"
                        );
                        assert!(!typed.contains(&name.to_owned()), "{name} typed twice");
                        typed.push(name.to_owned());
                    }
                    _ => panic!("unknown comment {line:?}"),
                }
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            let name = series.split('{').next().unwrap();
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':'),
                "{name:?}"
            );
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|base| typed.contains(&(*base).to_owned()))
                .unwrap_or(name);
            assert!(
                typed.contains(&family.to_owned()),
                "{name} has no TYPE line before it"
            );
            assert!(
                value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
                "{line:?}"
            );
            out.push((series.to_owned(), value.to_owned()));
        }
        out
    }

    fn value(text: &str, series: &str) -> String {
        samples(text)
            .into_iter()
            .find(|(s, _)| s == series)
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
            .1
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        assert_eq!(escape_label(r#"a\b"c"#), r#"a\\b\"c"#);
        assert_eq!(escape_label("line\nbreak"), "line\\nbreak");
        assert_eq!(escape_help("a\\b\nc \"q\""), "a\\\\b\\nc \"q\"");
        let mut e = Exposition::default();
        e.family("x_total", "counter", "Help with \\ and\nnewline.");
        e.sample("x_total", &[("k", "v\"1\""), ("j", "\\")], 3);
        assert_eq!(
            e.text,
            "# HELP x_total Help with \\\\ and\\nnewline.\n\
             # TYPE x_total counter\n\
             x_total{k=\"v\\\"1\\\"\",j=\"\\\\\"} 3\n"
        );
    }

    #[test]
    fn floats_are_written_as_the_format_reads_them() {
        assert_eq!(format_float(0.0005), "0.0005");
        assert_eq!(format_float(10.0), "10");
        assert_eq!(format_float(f64::INFINITY), "+Inf");
        assert_eq!(format_float(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_float(f64::NAN), "NaN");
        assert_eq!(format_float(1e-9), "0.000000001");
    }

    #[test]
    fn every_series_is_well_formed_and_present_from_the_start() {
        let m = Metrics::default();
        let text = m.render(&Levels::default());
        samples(&text);
        assert_eq!(value(&text, "coppice_sandboxes_created_total"), "0");
        for via in ["manual", "connect", "auto"] {
            let s = format!("coppice_sandboxes_resumed_total{{via=\"{via}\"}}");
            assert_eq!(value(&text, &s), "0");
        }
        for cause in ["manual", "timeout", "failure"] {
            let s = format!("coppice_sandboxes_killed_total{{cause=\"{cause}\"}}");
            assert_eq!(value(&text, &s), "0");
        }
        assert_eq!(
            value(
                &text,
                "coppice_http_request_duration_seconds_bucket{family=\"proxy_envd\",le=\"+Inf\"}"
            ),
            "0"
        );
        assert_eq!(
            value(
                &text,
                "coppice_webhook_attempts_total{outcome=\"delivered\"}"
            ),
            "0"
        );
        // Without the store's numbers the outbox gauge is left out rather than zero.
        assert!(!text.contains("coppice_webhook_outbox"));
        for reason in ["max_sandboxes", "memory"] {
            let s = format!("coppice_creates_refused_total{{reason=\"{reason}\"}}");
            assert_eq!(value(&text, &s), "0");
        }
        assert_eq!(value(&text, "coppice_sandboxes_capacity"), "0");
        assert!(!text.contains("coppice_host_memory_available_bytes"));
        let text = m.render(&Levels {
            capacity: crate::admission::Capacity {
                max_sandboxes: 10,
                used: 4,
                warm: 1,
                free: 6,
                mem_available_bytes: Some(3 << 30),
                min_free_memory_bytes: 1 << 30,
            },
            refused: crate::admission::Refused {
                max_sandboxes: 2,
                memory: 1,
            },
            ..Levels::default()
        });
        samples(&text);
        assert_eq!(value(&text, "coppice_sandboxes_capacity"), "10");
        assert_eq!(value(&text, "coppice_sandboxes_used"), "4");
        assert_eq!(value(&text, "coppice_sandboxes_free"), "6");
        assert_eq!(
            value(&text, "coppice_host_memory_available_bytes"),
            "3221225472"
        );
        assert_eq!(
            value(&text, "coppice_host_memory_floor_bytes"),
            "1073741824"
        );
        assert_eq!(
            value(
                &text,
                "coppice_creates_refused_total{reason=\"max_sandboxes\"}"
            ),
            "2"
        );
    }

    #[test]
    fn lifecycle_events_count_by_cause() {
        let m = Metrics::default();
        m.lifecycle(&LifecycleEvent::Created);
        m.lifecycle(&LifecycleEvent::Created);
        m.lifecycle(&LifecycleEvent::Paused {
            cause: Cause::Timeout,
        });
        m.lifecycle(&LifecycleEvent::Resumed {
            cause: Cause::AutoResume,
        });
        m.lifecycle(&LifecycleEvent::Resumed {
            cause: Cause::Connect,
        });
        m.lifecycle(&LifecycleEvent::Killed {
            cause: Cause::Manual,
        });
        m.lifecycle(&LifecycleEvent::Updated {
            update: coppice_lifecycle::state::Update::Refresh,
            end_at: coppice_lifecycle::state::Millis(0),
        });
        let text = m.render(&Levels {
            running: 1,
            paused: 2,
            ..Levels::default()
        });
        assert_eq!(value(&text, "coppice_sandboxes_created_total"), "2");
        assert_eq!(
            value(&text, "coppice_sandboxes_paused_total{cause=\"timeout\"}"),
            "1"
        );
        assert_eq!(
            value(&text, "coppice_sandboxes_paused_total{cause=\"manual\"}"),
            "0"
        );
        assert_eq!(
            value(&text, "coppice_sandboxes_resumed_total{via=\"auto\"}"),
            "1"
        );
        assert_eq!(
            value(&text, "coppice_sandboxes_resumed_total{via=\"connect\"}"),
            "1"
        );
        assert_eq!(
            value(&text, "coppice_sandboxes_killed_total{cause=\"manual\"}"),
            "1"
        );
        assert_eq!(value(&text, "coppice_sandboxes_running"), "1");
        assert_eq!(value(&text, "coppice_sandboxes_paused"), "2");
        assert!(!text.contains("coppice_warm_sandboxes{"));
        let text = m.render(&Levels {
            warm: vec![("base", 2)],
            pools: vec![(
                "base",
                PoolLevel {
                    target: 3,
                    hits: 4,
                    misses: 5,
                },
            )],
            ..Levels::default()
        });
        assert_eq!(
            value(&text, "coppice_warm_sandboxes{template=\"base\"}"),
            "2"
        );
        assert_eq!(
            value(&text, "coppice_warm_pool_target{template=\"base\"}"),
            "3"
        );
        assert_eq!(
            value(&text, "coppice_warm_pool_hits_total{template=\"base\"}"),
            "4"
        );
        assert_eq!(
            value(&text, "coppice_warm_pool_misses_total{template=\"base\"}"),
            "5"
        );
    }

    #[test]
    fn histograms_are_cumulative_and_count_matches_inf() {
        let m = Metrics::default();
        for ms in [0, 3, 3, 40, 20_000] {
            m.request(Family::Sandboxes, StatusCode::OK, Duration::from_millis(ms));
        }
        m.request(
            Family::Sandboxes,
            StatusCode::NOT_FOUND,
            Duration::from_millis(1),
        );
        let text = m.render(&Levels::default());
        let bucket = |le: &str| {
            value(
                &text,
                &format!(
                    "coppice_http_request_duration_seconds_bucket{{family=\"sandboxes\",le=\"{le}\"}}"
                ),
            )
        };
        assert_eq!(bucket("0.0005"), "1");
        assert_eq!(bucket("0.001"), "2");
        assert_eq!(bucket("0.005"), "4");
        assert_eq!(bucket("0.05"), "5");
        assert_eq!(bucket("10"), "5");
        assert_eq!(bucket("+Inf"), "6");
        assert_eq!(
            value(
                &text,
                "coppice_http_request_duration_seconds_count{family=\"sandboxes\"}"
            ),
            "6"
        );
        let sum: f64 = value(
            &text,
            "coppice_http_request_duration_seconds_sum{family=\"sandboxes\"}",
        )
        .parse()
        .unwrap();
        assert!((sum - 20.047).abs() < 1e-9, "{sum}");
        assert_eq!(
            value(
                &text,
                "coppice_http_responses_total{family=\"sandboxes\",code=\"4xx\"}"
            ),
            "1"
        );
        assert_eq!(
            value(
                &text,
                "coppice_http_responses_total{family=\"sandboxes\",code=\"2xx\"}"
            ),
            "5"
        );
        // Buckets never decrease.
        let mut last = 0u64;
        for (series, v) in samples(&text) {
            if series
                .starts_with("coppice_http_request_duration_seconds_bucket{family=\"sandboxes\"")
            {
                let v: u64 = v.parse().unwrap();
                assert!(v >= last, "{series}");
                last = v;
            }
        }
    }

    #[test]
    fn families_follow_the_route_table() {
        assert_eq!(Family::control("/v2/sandboxes"), Family::Sandboxes);
        assert_eq!(Family::control("/sandboxes/abc/logs"), Family::Sandboxes);
        assert_eq!(Family::control("/v2/sandboxes/abc/logs"), Family::Sandboxes);
        assert_eq!(Family::control("/events/sandboxes/abc"), Family::Events);
        assert_eq!(Family::control("/events/webhooks/x"), Family::Webhooks);
        assert_eq!(Family::control("/health"), Family::Health);
        assert_eq!(Family::control("/metrics"), Family::Metrics);
        assert_eq!(Family::control("/metrics/x"), Family::Other);
        assert_eq!(Family::control("/"), Family::Other);
        assert_eq!(Family::proxy(49983), Family::ProxyEnvd);
        assert_eq!(Family::proxy(49999), Family::ProxyCode);
        assert_eq!(Family::proxy(8080), Family::ProxyOther);
    }

    #[test]
    fn counted_bodies_add_their_data_frames() {
        use http_body_util::{BodyExt, Full};
        let m = Metrics::default();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let body = m.count_in(Full::new(bytes::Bytes::from_static(b"hello")));
            assert_eq!(body.collect().await.unwrap().to_bytes().len(), 5);
            let body = m.count_out(Full::new(bytes::Bytes::from_static(b"abc")));
            body.collect().await.unwrap();
        });
        let text = m.render(&Levels::default());
        assert_eq!(
            value(&text, "coppice_proxy_bytes_total{direction=\"in\"}"),
            "5"
        );
        assert_eq!(
            value(&text, "coppice_proxy_bytes_total{direction=\"out\"}"),
            "3"
        );
    }
}
