//! Prometheus metrics under vLLM's names, with an `m2n_serve:` prefix, plus
//! the runtime's per-layer `T_a`, `T_e`, `T_c`.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::worker::attention::MbTiming;

/// Every metric the server exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub ttft: Histogram,
    pub tpot: Histogram,
    pub e2e: Histogram,
    pub running: IntGauge,
    pub waiting: IntGauge,
    pub kv_usage: Gauge,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub success: IntCounterVec,
    pub iteration_tokens: Histogram,
    pub t_a: Histogram,
    pub t_e: Histogram,
    pub t_c: Histogram,
    /// Workers lost (exited, closed their control channel, or hung past
    /// the recovery window), by role.
    pub worker_losses: IntCounterVec,
    /// Replacement workers started (or standbys taken), by role.
    pub worker_replacements: IntCounterVec,
    /// Sequences moved to a new attention worker (prefilled again with
    /// the tokens they had generated).
    pub requests_resumed: IntCounter,
    /// Requests ended with an error by the engine (a recovery that did
    /// not finish, a worker that refused them).
    pub requests_failed: IntCounter,
    /// From a worker loss to the re-formed group's first step (its first tokens).
    pub recovery: Histogram,
    /// 0 whole, 1 degraded (recovering), 2 down.
    pub service_state: IntGauge,
}

const PREFIX: &str = "m2n_serve:";

fn latency_buckets() -> Vec<f64> {
    vec![
        0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
        7.5, 10.0, 20.0, 40.0, 80.0,
    ]
}

fn layer_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(1e-6, 2.0, 24).expect("valid buckets")
}

impl Metrics {
    pub fn new(model: &str) -> Self {
        let registry = Registry::new();
        let hist = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(
                HistogramOpts::new(format!("{PREFIX}{name}"), help)
                    .const_label("model_name", model)
                    .buckets(buckets),
            )
            .expect("valid histogram");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let ttft = hist(
            "time_to_first_token_seconds",
            "Time to first token: first token streamed minus request received.",
            latency_buckets(),
        );
        let tpot = hist(
            "time_per_output_token_seconds",
            "Time per output token after the first (inter-token).",
            latency_buckets(),
        );
        let e2e = hist(
            "e2e_request_latency_seconds",
            "End-to-end request latency.",
            latency_buckets(),
        );
        let iteration_tokens = hist(
            "iteration_tokens_total",
            "Rows (prefill and decode tokens) run per engine step.",
            prometheus::exponential_buckets(1.0, 2.0, 14).expect("valid buckets"),
        );
        let t_a = hist(
            "layer_attention_seconds",
            "T_a: attention, router and layout per micro-batch and layer.",
            layer_buckets(),
        );
        let t_e = hist(
            "layer_expert_seconds",
            "T_e: the slowest expert's compute per micro-batch and layer.",
            layer_buckets(),
        );
        let t_c = hist(
            "layer_comm_seconds",
            "T_c: dispatch posted to combine received, less the experts' time, per micro-batch and layer.",
            layer_buckets(),
        );
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::with_opts(
                Opts::new(format!("{PREFIX}{name}"), help).const_label("model_name", model),
            )
            .expect("valid gauge");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let running = gauge("num_requests_running", "Requests in the running batch.");
        let waiting = gauge(
            "num_requests_waiting",
            "Requests waiting to join the batch.",
        );
        let kv_usage = Gauge::with_opts(
            Opts::new(
                format!("{PREFIX}kv_cache_usage_perc"),
                "Share of the KV budget reserved (0 to 1).",
            )
            .const_label("model_name", model),
        )
        .expect("valid gauge");
        registry
            .register(Box::new(kv_usage.clone()))
            .expect("unique metric");
        let counter = |name: &str, help: &str| {
            let c = IntCounter::with_opts(
                Opts::new(format!("{PREFIX}{name}"), help).const_label("model_name", model),
            )
            .expect("valid counter");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let prompt_tokens = counter("prompt_tokens_total", "Prompt tokens admitted.");
        let generation_tokens = counter("generation_tokens_total", "Tokens generated.");
        let success = IntCounterVec::new(
            Opts::new(
                format!("{PREFIX}request_success_total"),
                "Requests finished, by finish reason.",
            )
            .const_label("model_name", model),
            &["finished_reason"],
        )
        .expect("valid counter");
        registry
            .register(Box::new(success.clone()))
            .expect("unique metric");
        let by_role = |name: &str, help: &str| {
            let c = IntCounterVec::new(
                Opts::new(format!("{PREFIX}{name}"), help).const_label("model_name", model),
                &["role"],
            )
            .expect("valid counter");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            for role in ["attention", "expert"] {
                c.with_label_values(&[role]);
            }
            c
        };
        let worker_losses = by_role("worker_losses_total", "Workers lost, by role.");
        let worker_replacements = by_role(
            "worker_replacements_total",
            "Replacement workers started or standbys taken, by role.",
        );
        let requests_resumed = counter(
            "requests_resumed_total",
            "Sequences resumed on a new attention worker after a loss.",
        );
        let requests_failed = counter(
            "request_failures_total",
            "Requests the engine ended with an error.",
        );
        let recovery = hist(
            "recovery_seconds",
            "From a worker loss to the re-formed group's first step.",
            prometheus::exponential_buckets(0.01, 2.0, 14).expect("valid buckets"),
        );
        let service_state = gauge(
            "service_state",
            "0: whole; 1: degraded (recovering from a worker loss); 2: down.",
        );
        Self {
            registry,
            ttft,
            tpot,
            e2e,
            running,
            waiting,
            kv_usage,
            prompt_tokens,
            generation_tokens,
            success,
            iteration_tokens,
            t_a,
            t_e,
            t_c,
            worker_losses,
            worker_replacements,
            requests_resumed,
            requests_failed,
            recovery,
            service_state,
        }
    }

    pub fn observe_timing(&self, t: &MbTiming) {
        self.t_a.observe(t.t_a as f64 / 1e9);
        self.t_e.observe(t.t_e as f64 / 1e9);
        self.t_c.observe(t.t_c as f64 / 1e9);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("encodable");
        String::from_utf8(buf).expect("UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_prefix_and_the_model() {
        let m = Metrics::new("tiny");
        m.ttft.observe(0.05);
        m.success.with_label_values(&["stop"]).inc();
        let text = m.render();
        for name in [
            "m2n_serve:time_to_first_token_seconds_bucket",
            "m2n_serve:time_per_output_token_seconds_count",
            "m2n_serve:e2e_request_latency_seconds_sum",
            "m2n_serve:num_requests_running",
            "m2n_serve:num_requests_waiting",
            "m2n_serve:prompt_tokens_total",
            "m2n_serve:generation_tokens_total",
            "m2n_serve:request_success_total{finished_reason=\"stop\",model_name=\"tiny\"} 1",
            "m2n_serve:layer_attention_seconds_bucket",
            "m2n_serve:layer_expert_seconds_bucket",
            "m2n_serve:layer_comm_seconds_bucket",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
