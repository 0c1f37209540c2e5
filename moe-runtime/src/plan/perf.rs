//! The performance model of MegaScale-Infer, per micro-batch and layer.
//!
//! Roofline-derived linear coefficients (documented formula):
//!
//! ```text
//! attention node (tp_a GPUs, b_a tokens, context s):
//!   k2 = attention weight bytes of a layer / (tp_a * BW * e_mem)
//!   k1 = max( s * KV bytes per token per layer / (tp_a * BW * e_mem),
//!             (2 * attention params per layer + 4 * s * heads * head_dim) / (tp_a * F * e_flop) )
//! expert node (tp_e GPUs, b_e tokens):
//!   k4 = expert weight bytes of a layer / (tp_e * BW * e_mem)
//!   k3 = 2 * expert params per layer / (tp_e * F * e_flop)
//! T_a = k1 * b_a + k2,  T_e = k3 * b_e + k4
//! ```
//!
//! (`e_mem` = 0.8 and `e_flop` = 0.6 of peak by default; tensor-parallel
//! all-reduces are not modelled.) Coefficients may instead come from
//! measured profiles. Communication, with sizes in bytes (bf16):
//!
//! ```text
//! T_c = max( (b_a*h*K/tp_a*2) / (W_a * Util(b_a*h*K/tp_a*2)),  (b_e*h/tp_e*2) / (W_e * Util(b_e*h/tp_e*2)) )
//! ```
//!
//! where W is NIC bandwidth per GPU and Util the link utilisation at that
//! message size: by default `s / (s + 256 KiB)` capped at 0.95 (a typical
//! M2N curve: half the link at 256 KiB), or the curve `m2n_perf --json`
//! measured.

use serde::{Deserialize, Serialize};

use super::gpu::GpuSpec;
use super::model::ModelConfig;
use super::PlanError;

/// Fractions of peak the kernels reach.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Efficiency {
    pub memory: f64,
    pub compute: f64,
}

impl Default for Efficiency {
    fn default() -> Self {
        Self {
            memory: 0.8,
            compute: 0.6,
        }
    }
}

/// `T = k * b + c`, seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Linear {
    /// Seconds per token.
    pub per_token: f64,
    /// Seconds regardless of tokens.
    pub fixed: f64,
}

impl Linear {
    pub fn at(&self, tokens: f64) -> f64 {
        self.per_token * tokens + self.fixed
    }
}

/// Attention coefficients (k1, k2) on `tp` GPUs of `gpu`.
pub fn attention_coeffs(
    m: &ModelConfig,
    gpu: &GpuSpec,
    tp: u64,
    seq_len: u64,
    eff: Efficiency,
) -> Linear {
    let tp = tp as f64;
    let bw = tp * gpu.bandwidth_bytes() * eff.memory;
    let flops = tp * gpu.flops() * eff.compute;
    let weights = (m.attention_params_per_layer() * m.dtype_bytes) as f64;
    let kv = (seq_len * m.kv_bytes_per_token_layer()) as f64;
    let work = 2.0 * m.attention_params_per_layer() as f64
        + (seq_len * m.attention_flops_per_context_token()) as f64;
    Linear {
        per_token: (kv / bw).max(work / flops),
        fixed: weights / bw,
    }
}

/// Expert coefficients (k3, k4) on `tp` GPUs of `gpu`.
pub fn expert_coeffs(m: &ModelConfig, gpu: &GpuSpec, tp: u64, eff: Efficiency) -> Linear {
    let tp = tp as f64;
    let bw = tp * gpu.bandwidth_bytes() * eff.memory;
    let flops = tp * gpu.flops() * eff.compute;
    Linear {
        per_token: 2.0 * m.expert_params_per_layer() as f64 / flops,
        fixed: (m.expert_params_per_layer() * m.dtype_bytes) as f64 / bw,
    }
}

/// Link utilisation as a function of message size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum UtilCurve {
    /// `s / (s + half)`, capped at `cap`.
    Saturating { half_bytes: f64, cap: f64 },
    /// Measured (bytes, utilisation) points, interpolated in log(size).
    Measured(Vec<(f64, f64)>),
}

impl Default for UtilCurve {
    fn default() -> Self {
        UtilCurve::Saturating {
            half_bytes: 256.0 * 1024.0,
            cap: 0.95,
        }
    }
}

impl UtilCurve {
    /// Reads the `utilisation_curve` of an `m2n_perf --json` report.
    pub fn from_m2n_perf(json: &str) -> Result<UtilCurve, PlanError> {
        let v: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| PlanError::BadConfig(format!("m2n_perf JSON: {e}")))?;
        let pts = v
            .get("utilisation_curve")
            .and_then(|c| c.as_array())
            .ok_or_else(|| PlanError::BadConfig("m2n_perf JSON has no utilisation_curve".into()))?;
        let mut out = Vec::new();
        for p in pts {
            let pair = p.as_array().filter(|a| a.len() == 2);
            let (s, u) = match pair.map(|a| (a[0].as_f64(), a[1].as_f64())) {
                Some((Some(s), Some(u))) if s > 0.0 && u > 0.0 && u <= 1.0 => (s, u),
                _ => {
                    return Err(PlanError::BadConfig(format!(
                        "utilisation point {p} is not [bytes > 0, 0 < util <= 1]"
                    )))
                }
            };
            out.push((s, u));
        }
        if out.is_empty() {
            return Err(PlanError::BadConfig("utilisation_curve is empty".into()));
        }
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        Ok(UtilCurve::Measured(out))
    }

    /// The link bandwidth (bytes/s) an `m2n_perf --json` report measured
    /// its utilisation against: the largest `busbw / utilisation` of its rows.
    pub fn peak_from_m2n_perf(json: &str) -> Result<f64, PlanError> {
        let v: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| PlanError::BadConfig(format!("m2n_perf JSON: {e}")))?;
        let rows = v
            .get("rows")
            .and_then(|r| r.as_array())
            .ok_or_else(|| PlanError::BadConfig("m2n_perf JSON has no rows".into()))?;
        let peak = rows
            .iter()
            .filter_map(|r| {
                let bw = r.get("m2n")?.get("busbw_gbps")?.as_f64()?;
                let u = r.get("utilisation")?.as_f64()?;
                (u > 0.0).then_some(bw / u)
            })
            .fold(0.0, f64::max);
        if peak > 0.0 {
            Ok(peak * 1e9)
        } else {
            Err(PlanError::BadConfig(
                "m2n_perf JSON rows have no busbw and utilisation".into(),
            ))
        }
    }

    pub fn at(&self, bytes: f64) -> f64 {
        match self {
            UtilCurve::Saturating { half_bytes, cap } => {
                (bytes / (bytes + half_bytes)).min(*cap).max(1e-6)
            }
            UtilCurve::Measured(pts) => {
                let first = pts[0];
                let last = pts[pts.len() - 1];
                if bytes <= first.0 {
                    return first.1;
                }
                if bytes >= last.0 {
                    return last.1;
                }
                let i = pts
                    .iter()
                    .position(|p| p.0 >= bytes)
                    .expect("inside the range");
                let (a, b) = (pts[i - 1], pts[i]);
                let t = (bytes.ln() - a.0.ln()) / (b.0.ln() - a.0.ln());
                a.1 + t * (b.1 - a.1)
            }
        }
    }
}

/// Measured coefficients, replacing the roofline ones: `{"attention":
/// {"per_token": k1, "fixed": k2}, "expert": {"per_token": k3, "fixed": k4}}`
/// in seconds, for the GPUs and tensor-parallel sizes they were measured on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub attention: Linear,
    pub expert: Linear,
}

/// Least-squares line through (tokens, seconds) points.
pub fn fit(points: &[(f64, f64)]) -> Result<Linear, PlanError> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return Err(PlanError::BadConfig(format!(
            "a profile needs at least two batch sizes, got {}",
            points.len()
        )));
    }
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let sxx: f64 = points.iter().map(|(x, _)| (x - mx).powi(2)).sum();
    if sxx == 0.0 {
        return Err(PlanError::BadConfig(
            "a profile needs at least two different batch sizes".into(),
        ));
    }
    let sxy: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let per_token = sxy / sxx;
    Ok(Linear {
        per_token: per_token.max(0.0),
        fixed: (my - per_token * mx).max(0.0),
    })
}

impl Profile {
    /// A profile from JSON: either `{"attention": {...}, "expert": {...}}`
    /// with the coefficients, or a `kernels-bench --json` report, fitted per
    /// layer for `model` (its row name, e.g. "mixtral-8x22b"): the expert
    /// from the `expert_ffn` rows (time vs tokens per expert), attention from
    /// the sum of the `attention`, `rmsnorm`, `rope` and `router` rows at
    /// the batch sizes where all were measured.
    pub fn from_json(json: &str, model: &str) -> Result<Profile, PlanError> {
        let v: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| PlanError::BadConfig(format!("profile: {e}")))?;
        let Some(rows) = v.get("rows").and_then(|r| r.as_array()) else {
            return serde_json::from_value(v)
                .map_err(|e| PlanError::BadConfig(format!("profile: {e}")));
        };
        let mut by: std::collections::BTreeMap<(String, u64), f64> = Default::default();
        for r in rows
            .iter()
            .filter(|r| r.get("model").and_then(|m| m.as_str()) == Some(model))
        {
            let (Some(k), Some(t), Some(us)) = (
                r.get("kernel").and_then(|x| x.as_str()),
                r.get("tokens").and_then(|x| x.as_u64()),
                r.get("time_us").and_then(|x| x.as_f64()),
            ) else {
                return Err(PlanError::BadConfig(format!(
                    "kernels-bench row {r} lacks kernel, tokens or time_us"
                )));
            };
            by.insert((k.to_string(), t), us * 1e-6);
        }
        let tokens: std::collections::BTreeSet<u64> = by.keys().map(|(_, t)| *t).collect();
        let expert: Vec<(f64, f64)> = tokens
            .iter()
            .filter_map(|&t| by.get(&("expert_ffn".into(), t)).map(|&s| (t as f64, s)))
            .collect();
        let parts = ["attention", "rmsnorm", "rope", "router"];
        let attention: Vec<(f64, f64)> = tokens
            .iter()
            .filter_map(|&t| {
                let times: Option<Vec<f64>> = parts
                    .iter()
                    .map(|k| by.get(&(k.to_string(), t)).copied())
                    .collect();
                times.map(|ts| (t as f64, ts.iter().sum()))
            })
            .collect();
        if expert.is_empty() && attention.is_empty() {
            return Err(PlanError::BadConfig(format!(
                "the kernels-bench report has no rows for model {model:?}"
            )));
        }
        Ok(Profile {
            attention: fit(&attention)?,
            expert: fit(&expert)?,
        })
    }
}

/// Everything fixed while a plan is evaluated.
#[derive(Debug, Clone)]
pub struct Setting {
    pub model: ModelConfig,
    pub attention_gpu: GpuSpec,
    pub expert_gpu: GpuSpec,
    /// Context length s for KV-cache reads and memory.
    pub seq_len: u64,
    pub slo_s: f64,
    pub eff: Efficiency,
    pub util: UtilCurve,
    pub profile: Option<Profile>,
    /// The largest number of micro-batches tried (N_m).
    pub max_micro_batches: u64,
}

impl Setting {
    pub fn attention(&self, tp_a: u64) -> Linear {
        self.profile.map(|p| p.attention).unwrap_or_else(|| {
            attention_coeffs(
                &self.model,
                &self.attention_gpu,
                tp_a,
                self.seq_len,
                self.eff,
            )
        })
    }
    pub fn expert(&self, tp_e: u64) -> Linear {
        self.profile
            .map(|p| p.expert)
            .unwrap_or_else(|| expert_coeffs(&self.model, &self.expert_gpu, tp_e, self.eff))
    }

    /// The memory constraint of an attention node:
    /// `m b_a s L kv + 2 P_a < tp_a C_a` (KV cache of m micro-batches
    /// plus weights, bf16; `kv` the bytes per token and layer: `4 h / g`
    /// for GQA with `head_dim = h / heads`, MLA's latent and rope key).
    pub fn attention_fits(&self, tp_a: u64, m: u64, b_a: u64) -> bool {
        let md = &self.model;
        let kv = (m * b_a * self.seq_len * md.layers * md.kv_bytes_per_token_layer()) as f64;
        kv + 2.0 * (md.attention_params() as f64) < tp_a as f64 * self.attention_gpu.memory_bytes()
    }

    /// Whether an expert node's weights fit: `2 P_e < tp_e C_e`.
    pub fn expert_fits(&self, tp_e: u64) -> bool {
        2.0 * (self.model.expert_params() as f64) < tp_e as f64 * self.expert_gpu.memory_bytes()
    }

    /// One transfer's time T_c.
    pub fn comm(&self, tp_a: u64, tp_e: u64, b_a: f64, b_e: f64) -> f64 {
        let md = &self.model;
        let a = b_a * (md.hidden * md.top_k) as f64 / tp_a as f64 * md.dtype_bytes as f64;
        let e = b_e * md.hidden as f64 / tp_e as f64 * md.dtype_bytes as f64;
        let ta = a / (self.attention_gpu.nic_bytes() * self.util.at(a));
        let te = e / (self.expert_gpu.nic_bytes() * self.util.at(e));
        ta.max(te)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_from_kernels_bench_are_least_squares_lines() {
        let mut rows = Vec::new();
        for t in [1u64, 8, 64] {
            // expert: 2 us per token + 100 us; attention parts: 1 us per token + 10 us in all.
            rows.push(serde_json::json!({"model": "m", "kernel": "expert_ffn", "tokens": t, "time_us": 2.0 * t as f64 + 100.0}));
            for (k, per, fixed) in [
                ("attention", 0.7, 4.0),
                ("rmsnorm", 0.1, 2.0),
                ("rope", 0.1, 2.0),
                ("router", 0.1, 2.0),
            ] {
                rows.push(serde_json::json!({"model": "m", "kernel": k, "tokens": t, "time_us": per * t as f64 + fixed}));
            }
            rows.push(serde_json::json!({"model": "other", "kernel": "expert_ffn", "tokens": t, "time_us": 1e6}));
        }
        let json = serde_json::json!({"rows": rows}).to_string();
        let p = Profile::from_json(&json, "m").unwrap();
        assert!(
            (p.expert.per_token - 2e-6).abs() < 1e-12 && (p.expert.fixed - 100e-6).abs() < 1e-12,
            "{p:?}"
        );
        assert!(
            (p.attention.per_token - 1e-6).abs() < 1e-12
                && (p.attention.fixed - 10e-6).abs() < 1e-12,
            "{p:?}"
        );
        assert!(Profile::from_json(&json, "nope").is_err());
        let direct = r#"{"attention": {"per_token": 1e-6, "fixed": 1e-5}, "expert": {"per_token": 2e-6, "fixed": 1e-4}}"#;
        assert_eq!(
            Profile::from_json(direct, "m").unwrap().expert.per_token,
            2e-6
        );
    }

    #[test]
    fn util_curves() {
        let d = UtilCurve::default();
        assert!((d.at(256.0 * 1024.0) - 0.5).abs() < 1e-9);
        assert!(d.at(1e12) <= 0.95);
        let m = UtilCurve::from_m2n_perf(r#"{"utilisation_curve": [[1024, 0.1], [1048576, 0.9]]}"#)
            .unwrap();
        assert_eq!(m.at(10.0), 0.1);
        assert_eq!(m.at(1e9), 0.9);
        assert!((m.at(32768.0) - 0.5).abs() < 1e-9, "log-midpoint");
        assert!(UtilCurve::from_m2n_perf(r#"{"utilisation_curve": [[1024, 1.5]]}"#).is_err());
    }
}
