//! Per-iteration samples and what is printed from them.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Summary of one size's samples (iteration times in microseconds).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub samples: usize,
    pub mean_us: f64,
    pub min_us: f64,
    pub max_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub cv_pct: f64,
}

impl Summary {
    /// From per-iteration times in seconds.
    pub fn of(samples: &[f64]) -> Summary {
        let mut h =
            Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid bounds");
        for &s in samples {
            let _ = h.record(((s * 1e9) as u64).max(1));
        }
        let n = samples.len().max(1) as f64;
        let mean = samples.iter().sum::<f64>() / n;
        let var = samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / n;
        let q = |x: f64| h.value_at_quantile(x) as f64 / 1e3;
        Summary {
            samples: samples.len(),
            mean_us: mean * 1e6,
            min_us: h.min() as f64 / 1e3,
            max_us: h.max() as f64 / 1e3,
            p50_us: q(0.5),
            p99_us: q(0.99),
            p999_us: q(0.999),
            cv_pct: if mean > 0.0 {
                100.0 * var.sqrt() / mean
            } else {
                0.0
            },
        }
    }
}
