//! What `moe-bench` measures: decode throughput of a disaggregated group
//! with per-micro-batch `T_a`, `T_e`, `T_c` and idle shares, and a
//! colocated baseline (one process, the same kernels, threads on every
//! core) at the same batch.

use std::time::Instant;

use half::bf16;
use kernels::cpu::attention::KvCache;
use kernels::cpu::ffn::FfnScratch;
use serde::{Deserialize, Serialize};

use crate::model::forward::Scratch;
use crate::model::reference::Reference;
use crate::model::RuntimeError;
use crate::worker::attention::{AttentionWorker, Request, StepReport};

/// One measured configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BenchSpec {
    /// Global batch: sequences decoding together, over all attention ranks.
    pub batch: usize,
    pub prompt_len: usize,
    pub warmup: usize,
    pub steps: usize,
}

/// The synthetic prompt of sequence `i`.
pub fn prompt(i: usize, len: usize, vocab: u64) -> Vec<u32> {
    (0..len)
        .map(|j| ((i * 7919 + j * 104_729 + 1) as u64 % vocab) as u32)
        .collect()
}

/// One attention rank's measurement (sums over the measured steps).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AttentionBench {
    pub rank: usize,
    pub seqs: usize,
    pub steps: u64,
    pub tokens: u64,
    pub wall_ns: u64,
    pub wait_ns: u64,
    /// Per (layer, micro-batch) samples.
    pub samples: u64,
    pub t_a_ns: u64,
    /// Of `t_a_ns`, the shared experts'.
    pub t_shared_ns: u64,
    /// Dense layers' time (attention and MLP), over the measured steps.
    pub dense_ns: u64,
    pub t_e_ns: u64,
    /// T_c over the clean samples only (see `MbTiming::t_c_clean`).
    pub t_c_ns: u64,
    pub t_c_samples: u64,
    pub residence_ns: u64,
    /// Micro-batch rows and rows sent to experts, summed over samples.
    pub rows: u64,
    pub expert_rows: u64,
    /// The transport the worker's communicator runs on.
    #[serde(default)]
    pub transport: String,
}

/// Runs the attention side: this rank's share of `spec.batch` sequences
/// (sequence `i` on rank `i % ranks`), prefilled in the first step, then
/// `warmup` unmeasured and `steps` measured decode steps; then it leaves
/// the group with an idle step.
pub fn run_attention(
    w: &mut AttentionWorker,
    spec: &BenchSpec,
    ranks: usize,
    vocab: u64,
) -> Result<AttentionBench, RuntimeError> {
    let rank = w.rank();
    let mine: Vec<usize> = (0..spec.batch).filter(|i| i % ranks == rank).collect();
    let budget = 1 + spec.warmup + spec.steps + 1;
    for &i in &mine {
        w.submit(
            i as u64,
            Request {
                prompt: prompt(i, spec.prompt_len, vocab),
                max_new: budget,
                ..Default::default()
            },
        )?;
    }
    let mut b = AttentionBench {
        rank,
        seqs: mine.len(),
        transport: w.transport().name().to_string(),
        ..Default::default()
    };
    // Prefill (one step: the launcher sizes the micro-batches for it) and
    // warm-up; one report for every step, so that measured decode steps
    // allocate nothing.
    let mut r = StepReport::default();
    for _ in 0..1 + spec.warmup {
        w.step_into(&mut r)?;
    }
    for _ in 0..spec.steps {
        w.step_into(&mut r)?;
        b.steps += 1;
        b.tokens += r.tokens.len() as u64;
        b.wall_ns += r.wall_ns;
        b.wait_ns += r.wait_ns;
        b.dense_ns += r.dense_ns;
        for t in &r.timings {
            b.samples += 1;
            b.t_a_ns += t.t_a;
            b.t_shared_ns += t.t_shared;
            b.t_e_ns += t.t_e;
            if t.t_c_clean {
                b.t_c_ns += t.t_c;
                b.t_c_samples += 1;
            }
            b.residence_ns += t.residence;
            b.rows += u64::from(t.rows);
            b.expert_rows += u64::from(t.expert_rows);
        }
    }
    for &i in &mine {
        w.cancel(i as u64);
    }
    while w.step()?.group_active {}
    Ok(b)
}

/// The colocated baseline's measurement.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ColocatedBench {
    pub threads: usize,
    pub tokens: u64,
    pub wall_ns: u64,
}

impl ColocatedBench {
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / (self.wall_ns.max(1) as f64 / 1e9)
    }
}

/// The same batch in one process: `threads` threads, each decoding its
/// share of the sequences through every layer (attention and all experts),
/// with the same kernels as the workers.
pub fn run_colocated(r: &Reference, spec: &BenchSpec, threads: usize) -> ColocatedBench {
    let threads = threads.clamp(1, spec.batch.max(1));
    let vocab = r.config.vocab;
    let layers = r.config.layers as usize;
    let barrier = std::sync::Barrier::new(threads);
    let results: Vec<(u64, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                s.spawn(move || {
                    let mine: Vec<usize> = (0..spec.batch).filter(|i| i % threads == t).collect();
                    let mut caches: Vec<Vec<KvCache>> = mine
                        .iter()
                        .map(|_| vec![KvCache::default(); layers])
                        .collect();
                    let mut inputs: Vec<Vec<u32>> = mine
                        .iter()
                        .map(|&i| prompt(i, spec.prompt_len, vocab))
                        .collect();
                    let mut pos = vec![0usize; mine.len()];
                    let (mut sc, mut ffn) = (Scratch::default(), FfnScratch::default());
                    let (mut x, mut logits): (Vec<bf16>, Vec<f32>) = (Vec::new(), Vec::new());
                    let h = r.config.hidden as usize;
                    let mut run_step = || {
                        let tokens: Vec<u32> = inputs.iter().flatten().copied().collect();
                        r.embed(&tokens, &mut x);
                        let starts: Vec<(usize, usize)> = pos
                            .iter()
                            .zip(&inputs)
                            .map(|(&p, i)| (p, i.len()))
                            .collect();
                        r.forward(&mut x, &mut caches, &starts, &mut sc, &mut ffn);
                        let mut row = 0;
                        for (k, inp) in inputs.iter_mut().enumerate() {
                            row += inp.len();
                            pos[k] += inp.len();
                            let (tok, _) =
                                r.next_token(&x[(row - 1) * h..row * h], &mut logits, &mut sc);
                            *inp = vec![tok];
                        }
                        mine.len() as u64
                    };
                    for _ in 0..1 + spec.warmup {
                        run_step();
                    }
                    barrier.wait();
                    let t0 = Instant::now();
                    let mut tokens = 0;
                    for _ in 0..spec.steps {
                        tokens += run_step();
                    }
                    (tokens, t0.elapsed().as_nanos() as u64)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("colocated thread"))
            .collect()
    });
    ColocatedBench {
        threads,
        tokens: results.iter().map(|r| r.0).sum(),
        wall_ns: results.iter().map(|r| r.1).max().unwrap_or(1),
    }
}
