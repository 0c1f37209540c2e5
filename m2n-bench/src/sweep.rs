//! The size sweep: m2n and the baseline measured at each size, one table
//! row per size, and m2n's transport work over the whole sweep.

use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use serde::Serialize;

use crate::cli::{Args, Pattern};
use crate::contender::Contender;
use crate::report::{self, Run};
use crate::run::{Clock, M2nRank, Sample, Span};
use crate::stats::Summary;
use crate::{abort, limit};

/// One contender's figures at one size.
#[derive(Debug, Serialize)]
pub struct Side {
    pub time_us: f64,
    pub algbw_gbps: f64,
    pub busbw_gbps: f64,
    pub wrong: u64,
    pub stats: Summary,
}

/// One size's row of the table and of the JSON report.
#[derive(Debug, Serialize)]
pub struct Row {
    pub bytes: usize,
    pub m2n: Side,
    pub baseline: Option<Side>,
    pub memcpy_gbps: f64,
    /// m2n busbw / the peak (see `peak_source`).
    pub utilisation: f64,
}

/// Transport work per round, averaged over each side's ranks: work
/// requests, inline, signalled, doorbells, CQ polls, completions, receive
/// posts (the order of [`m2n::transport::TransportCounters`]).
#[derive(Debug, Serialize)]
pub struct WorkPerRound {
    pub fields: [&'static str; 7],
    pub attention: [f64; 7],
    pub expert: [f64; 7],
}

/// What a sweep found. The rows and the wrong bytes are rank 0's only
/// (the other ranks' are empty and 0); the work per round is every rank's.
pub struct Sweep {
    pub rows: Vec<Row>,
    pub total_wrong: u64,
    pub per_round: Option<WorkPerRound>,
}

/// Measures m2n and the baseline at each of the run's sizes; rank 0
/// prints each row as soon as it has it.
pub fn sweep(
    world: &SimpleCommunicator,
    run: &Run,
    contender: &mut M2nRank,
    mut baseline: Option<&mut Contender>,
) -> Sweep {
    let (args, place) = (run.args, run.place);
    let mut rows: Vec<Row> = Vec::new();
    let mut total_wrong = 0u64;
    let (work_before, rounds_before) = (contender.comm.transport_counters(), contender.rounds());
    let mut clock = Clock::new(args.timing, run.wait);
    for &s in &args.sizes() {
        let measured = measure(world, args, &mut clock, |clock, step| {
            let sample = contender
                .iteration(world, clock, args.pattern, s, step == Step::Check)
                .unwrap_or_else(|e| abort(world, place, e));
            if step == Step::Last {
                contender.drain().unwrap_or_else(|e| abort(world, place, e));
            }
            sample
        });
        contender.drain().unwrap_or_else(|e| abort(world, place, e));
        let m2n_side = side(args, place.m, place.n, s, &measured);
        let base_side = baseline.as_mut().map(|b| {
            let measured = measure(world, args, &mut clock, |clock, step| {
                let sample = b.iteration(world, clock, place, args.pattern, s, step == Step::Check);
                if step == Step::Last {
                    b.drain();
                }
                sample
            });
            b.drain();
            side(args, place.m, place.n, s, &measured)
        });
        world.barrier();
        if world.rank() != 0 {
            continue;
        }
        let memcpy = limit::memcpy_gbps(s, run.depth);
        total_wrong += m2n_side.wrong + base_side.as_ref().map_or(0, |b| b.wrong);
        report::print_row(args, s, &m2n_side, base_side.as_ref(), memcpy);
        rows.push(Row {
            bytes: s,
            m2n: m2n_side,
            baseline: base_side,
            memcpy_gbps: memcpy,
            utilisation: 0.0,
        });
    }
    let per_round = work_per_round(
        world,
        place.m,
        contender.comm.transport_counters().since(&work_before),
        contender.rounds() - rounds_before,
    );
    Sweep {
        rows,
        total_wrong,
        per_round,
    }
}

/// One contender's iterations at one size, over all ranks.
struct Measured {
    /// Per iteration, the maximum over ranks (seconds).
    samples: Vec<f64>,
    /// Loop timing: each rank's elapsed time over the iterations divided
    /// by their number, the largest over ranks (seconds).
    loop_mean: Option<f64>,
    /// Wrong bytes over all ranks.
    wrong: u64,
}

/// Which iteration [`measure`] asks a contender for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// A warm-up or timed iteration.
    Run,
    /// The last warm-up or timed iteration: the contender also waits
    /// until every round this rank sent is done (its drain), and
    /// [`measure`] extends the iteration's span over that wait.
    Last,
    /// The check iteration: every byte filled and checked.
    Check,
}

/// Runs warm-up, timed and check iterations of one contender at one size,
/// the ranks lined up before each of the three.
///
/// Back to back, a sender's last iterations leave up to `depth` rounds in
/// flight; the last warm-up and timed iterations wait for them (`Step::Last`)
/// before this rank goes into MPI, and the timed span covers that wait, as
/// fi_rma_bw waits for its last completions before it stops its clock. A
/// write m2n still holds (the provider had no room for it when it was
/// posted) moves only while its sender calls m2n: a sender waiting in MPI
/// for a receiver that waits for that write would be judged lost by the
/// receiver after the peer timeout (one run of `scripts/fabric-bench` over
/// libfabric's tcp ended so at 4 MiB one-way, not reproduced since).
fn measure(
    world: &SimpleCommunicator,
    args: &Args,
    clock: &mut Clock,
    mut iteration: impl FnMut(&mut Clock, Step) -> Sample,
) -> Measured {
    // The `i`th of `n` iterations, its span extended over the drain of
    // the last one.
    let mut run = |clock: &mut Clock, i: u32, n: u32| {
        if i + 1 < n {
            return iteration(clock, Step::Run).span;
        }
        let span = iteration(clock, Step::Last).span;
        span + clock.extend()
    };
    clock.line_up(world);
    for i in 0..args.warmup {
        run(clock, i, args.warmup);
    }
    clock.line_up(world);
    let spans: Vec<Span> = (0..args.iters).map(|i| run(clock, i, args.iters)).collect();
    let unit = clock.secs_per_unit();
    let mine: Vec<f64> = spans.iter().map(|s| s.secs(unit)).collect();
    let mut samples = vec![0.0f64; mine.len()];
    world.all_reduce_into(&mine[..], &mut samples[..], SystemOperation::max());
    // Back to back, a rank's iterations tile its time, so their sum is
    // its elapsed time; the sum of per-iteration maxima is not anyone's
    // (it adds up each iteration's slower rank: a sender's long wait for
    // its window and the receiver's long wait for the next round fall in
    // different iterations): over fabric's shm it came out 2-6% longer
    // than either rank's elapsed time for round trips and 11-39% for
    // one-way rounds of 64 KiB to 1 MiB.
    let loop_mean = clock.back_to_back().then(|| {
        let own = mine.iter().sum::<f64>() / mine.len().max(1) as f64;
        let mut slowest = 0.0f64;
        world.all_reduce_into(&own, &mut slowest, SystemOperation::max());
        slowest
    });
    let mut wrong = 0u64;
    if args.check == 1 {
        clock.line_up(world);
        let mine = iteration(clock, Step::Check).wrong;
        world.all_reduce_into(&mine, &mut wrong, SystemOperation::sum());
    }
    Measured {
        samples,
        loop_mean,
        wrong,
    }
}

/// A contender's row figures. The time is the mean per iteration: with
/// barrier timing, of the per-iteration maxima over ranks (each round's
/// completion); with loop timing, the slowest rank's elapsed time over
/// the iterations divided by their number, as nccl-tests (`-a 3`) and
/// fabtests report a loop. The percentiles are of the per-iteration maxima
/// either way.
fn side(args: &Args, m: usize, n: usize, size: usize, measured: &Measured) -> Side {
    let stats = Summary::of(&measured.samples);
    let wrong = measured.wrong;
    let time = measured.loop_mean.unwrap_or(stats.mean_us * 1e-6);
    let rounds = if args.pattern == Pattern::Roundtrip {
        2.0
    } else {
        1.0
    };
    // algbw: all payload of one iteration over all pairs, per second.
    let algbw = rounds * (m * n * size) as f64 / time / 1e9;
    // busbw: what the busiest rank's link carries: max(N, M) messages each way.
    let busbw = rounds * (m.max(n) * size) as f64 / time / 1e9;
    Side {
        time_us: time * 1e6,
        algbw_gbps: algbw,
        busbw_gbps: busbw,
        wrong,
        stats,
    }
}

/// Gathers every rank's counters over `rounds` rounds; `None` when the
/// transport counts nothing (shm, tcp).
fn work_per_round(
    world: &SimpleCommunicator,
    m: usize,
    c: m2n::transport::TransportCounters,
    rounds: u64,
) -> Option<WorkPerRound> {
    let v = c.values();
    let mine = [v[0], v[1], v[2], v[3], v[4], v[5], v[6], rounds];
    let mut all = vec![0u64; 8 * world.size() as usize];
    world.all_gather_into(&mine[..], &mut all[..]);
    if all.chunks(8).all(|r| r[..7].iter().all(|&v| v == 0)) {
        return None;
    }
    let mean = |ranks: &[&[u64]]| {
        let mut out = [0.0; 7];
        for r in ranks {
            for i in 0..7 {
                out[i] += r[i] as f64 / r[7].max(1) as f64 / ranks.len() as f64;
            }
        }
        out
    };
    let rows: Vec<&[u64]> = all.chunks(8).collect();
    Some(WorkPerRound {
        fields: m2n::transport::TransportCounters::FIELDS,
        attention: mean(&rows[..m]),
        expert: mean(&rows[m..]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn a_loop_is_timed_by_the_slowest_ranks_elapsed_time_not_by_summed_maxima() {
        let args = Args::parse_from([
            "m2n_perf",
            "--senders",
            "1",
            "--pattern",
            "dispatch",
            "--timing",
            "loop",
        ]);
        // Two ranks whose iterations take 1 and 3 us in turn, out of step:
        // each rank's two iterations took 4 us, while the per-iteration
        // maxima are 3 and 3.
        let measured = Measured {
            samples: vec![3e-6, 3e-6],
            loop_mean: Some(2e-6),
            wrong: 0,
        };
        let s = side(&args, 1, 1, 1000, &measured);
        assert!((s.time_us - 2.0).abs() < 1e-9, "{}", s.time_us);
        // 1000 bytes per 2 us.
        assert!((s.algbw_gbps - 0.5).abs() < 1e-9, "{}", s.algbw_gbps);
        // The percentiles stay those of the per-iteration maxima.
        assert!((s.stats.p50_us - 3.0).abs() < 0.01, "{}", s.stats.p50_us);
        // Barrier timing: each iteration is a round of its own, and its
        // time is the slower rank's.
        let barrier = Measured {
            loop_mean: None,
            ..measured
        };
        let s = side(&args, 1, 1, 1000, &barrier);
        assert!((s.time_us - 3.0).abs() < 0.01, "{}", s.time_us);
    }
}
