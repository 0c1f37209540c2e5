//! A decode step allocates nothing once warm: a counting global allocator
//! around a 1 x 2 group in this process (the attention worker on the test's
//! thread, each expert worker on a thread of its own, every thread counted),
//! two micro-batches, greedy and sampled sequences, over shm and tcp, with
//! and without a shared expert.

#[path = "../../tests/support/counting.rs"]
mod counting;

mod support;

use std::time::Duration;

use m2n::{Communicator, Config, Role, Root, Shape, TransportKind, WaitPolicy};
use moe_runtime::model::init::StoreDtype;
use moe_runtime::model::load_config;
use moe_runtime::model::weights::{AttentionWeights, Checkpoint, ExpertWeights};
use moe_runtime::worker::attention::{AttentionWorker, Request, Sampling, StepReport};
use moe_runtime::worker::expert::ExpertWorker;
use moe_runtime::worker::Deployment;
use support::{checkpoint, TempDir};

const TIMEOUT: Duration = Duration::from_secs(30);

/// Allocations in each of `measured` decode steps after `warm` steps
/// (prefill and the first decode steps) of a 1 x 2 group.
fn allocations_per_step(
    preset: &str,
    transport: TransportKind,
    warm: usize,
    measured: usize,
) -> Vec<u64> {
    let tmp = TempDir::new(&format!("alloc-{preset}-{transport:?}"));
    let dir = checkpoint(tmp.path(), preset, 7, 1, StoreDtype::Bf16);
    let config = load_config(&dir).unwrap();
    let deploy = Deployment {
        attention: 1,
        experts: 2,
        microbatches: 2,
        max_tokens: 16,
    };
    let m2n = deploy.m2n_config(
        &config,
        Config {
            transport,
            wait: WaitPolicy::Yield,
            ..Config::default()
        },
    );
    let shape = Shape::new(deploy.attention, deploy.experts);
    let root = Root::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let uid = root.unique_id().clone();
    let served = root.spawn(TIMEOUT);
    let experts: Vec<_> = (0..deploy.experts)
        .map(|rank| {
            let (dir, config, m2n, uid) = (dir.clone(), config.clone(), m2n.clone(), uid.clone());
            std::thread::spawn(move || {
                let ck = Checkpoint::open(&dir).unwrap();
                let range = deploy.experts_of(&config, rank);
                let weights = ExpertWeights::load(&ck, &config, range.start, range.len()).unwrap();
                let comm = Communicator::init(m2n, Role::Expert, rank, shape, &uid).unwrap();
                let mut w = ExpertWorker::new(config, deploy, weights, comm, TIMEOUT).unwrap();
                w.run().unwrap()
            })
        })
        .collect();
    let weights = AttentionWeights::load(&Checkpoint::open(&dir).unwrap(), &config).unwrap();
    let comm = Communicator::init(m2n, Role::Attention, 0, shape, &uid).unwrap();
    served.join().unwrap().unwrap();
    let mut w = AttentionWorker::new(config, deploy, weights, comm, TIMEOUT).unwrap();
    for (id, temperature) in [(1, 0.0), (2, 0.8), (3, 0.0), (4, 1.0)] {
        let request = Request {
            prompt: (0..3 + id as u32).collect(),
            max_new: warm + measured + 2,
            stop: Vec::new(),
            sampling: Sampling {
                temperature,
                top_p: 0.9,
                seed: id,
                // Sequence 3 takes the penalties' path (a copy of the
                // logits, the seen flags) every step.
                repetition_penalty: if id == 3 { 1.3 } else { 1.0 },
                frequency_penalty: if id == 3 { 0.5 } else { 0.0 },
                presence_penalty: if id == 3 { 0.25 } else { 0.0 },
                ..Sampling::default()
            },
            prompt_logprobs: None,
            resume: Vec::new(),
        };
        w.submit(id, request).unwrap();
    }
    let mut report = StepReport::default();
    for _ in 0..warm {
        w.step_into(&mut report).unwrap();
    }
    let mut per_step = Vec::new();
    for _ in 0..measured {
        let before = counting::allocations();
        w.step_into(&mut report).unwrap();
        per_step.push(counting::allocations() - before);
        assert_eq!(report.tokens.len(), 4, "every sequence decodes a token");
        assert_eq!(report.rows, 4, "decode steps: one row per sequence");
    }
    w.cancel_all();
    while w.step().unwrap().group_active {}
    for e in experts {
        let stats = e.join().unwrap();
        assert!(stats.rows > 0);
    }
    per_step
}

#[test]
fn decode_steps_allocate_nothing_once_warm() {
    // tiny: Mixtral's layer; qwen2-moe-mini: biases and a shared expert
    // on the attention side; deepseek-v3-mini: MLA, the grouped router and
    // a dense layer.
    for (preset, transport) in [
        ("tiny", TransportKind::Shm),
        ("tiny", TransportKind::Tcp),
        ("qwen2-moe-mini", TransportKind::Shm),
        ("deepseek-v3-mini", TransportKind::Shm),
    ] {
        let per_step = allocations_per_step(preset, transport, 4, 12);
        assert!(
            per_step.iter().all(|&n| n == 0),
            "{preset} over {transport:?}: allocations in each measured decode step: {per_step:?}"
        );
    }
}
