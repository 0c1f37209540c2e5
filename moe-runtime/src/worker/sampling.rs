//! How a sequence's next token is chosen from its logits, in vLLM's order:
//!
//! 1. `min_tokens`: until that many tokens are out, the stop tokens get
//!    `-inf` (the sequence cannot end);
//! 2. the penalties ([`apply_penalties`]): repetition (every token seen in
//!    the prompt or the output: a positive logit is divided by the
//!    penalty, a negative one multiplied), then frequency (minus the
//!    penalty times the token's count in the output) and presence (minus
//!    the penalty once for a token the output holds);
//! 3. greedy (temperature 0) takes the largest processed logit; otherwise
//!    [`sample_with`] draws from `softmax(logits / temperature)` restricted
//!    to `min_p` (tokens at least `min_p` times as likely as the best),
//!    then the `top_k` most likely, then the nucleus `top_p`.
//!
//! Reported log-probabilities are of the raw logits (vLLM's default
//! `raw_logprobs`): what the model said, before any of the above.

/// How the next token is chosen. The neutral value of every knob leaves
/// the logits as they are (see [`Sampling::default`]).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Sampling {
    /// 0: greedy (the largest logit); else sample from `softmax(logits / T)`.
    pub temperature: f32,
    /// Nucleus: sample among the most likely tokens whose probabilities
    /// add up to `top_p` (1 or 0: all).
    pub top_p: f32,
    /// Seed of the sequence's own random stream: the same seed gives the
    /// same tokens (the logits are batch-invariant).
    pub seed: u64,
    /// How many most-likely tokens to report with each token.
    pub top_logprobs: usize,
    /// Sample among the `top_k` most likely tokens (0: all).
    pub top_k: u32,
    /// Drop tokens less than `min_p` times as likely as the most likely
    /// one (0: none).
    pub min_p: f32,
    /// Above 1 discourages any token already in the prompt or output,
    /// below 1 encourages it (1: off).
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of each token the output holds.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time the output holds it.
    pub frequency_penalty: f32,
    /// The stop tokens are barred until this many tokens are out.
    pub min_tokens: u32,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            top_logprobs: 0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            min_tokens: 0,
        }
    }
}

impl Sampling {
    /// The first knob out of its range, named, or `None`.
    pub fn check(&self) -> Option<String> {
        let finite = |x: f32| x.is_finite();
        if !(finite(self.temperature) && self.temperature >= 0.0) {
            return Some(format!(
                "temperature {} must be a finite number >= 0",
                self.temperature
            ));
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return Some(format!("top_p {} must be in [0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Some(format!("min_p {} must be in [0, 1]", self.min_p));
        }
        if !(finite(self.repetition_penalty) && self.repetition_penalty > 0.0) {
            return Some(format!(
                "repetition_penalty {} must be a finite number > 0",
                self.repetition_penalty
            ));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Some(format!("{name} {v} must be in [-2, 2]"));
            }
        }
        None
    }

    /// Whether step 1 or 2 of the module's order changes anything for a
    /// sequence with `generated` tokens out and `stop` tokens.
    pub fn processes(&self, generated: usize, stop: &[u32]) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || ((generated as u64) < u64::from(self.min_tokens) && !stop.is_empty())
    }
}

/// Steps 1 and 2 of the module's order, in place. `seen` is scratch with
/// a flag per vocabulary entry, all false on entry and left all false.
pub fn apply_penalties(
    logits: &mut [f32],
    s: &Sampling,
    prompt: &[u32],
    generated: &[u32],
    stop: &[u32],
    seen: &mut [bool],
) {
    if (generated.len() as u64) < u64::from(s.min_tokens) {
        for &t in stop {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
    let r = s.repetition_penalty;
    if r != 1.0 {
        for &t in prompt.iter().chain(generated) {
            let t = t as usize;
            if !seen[t] {
                seen[t] = true;
                let l = logits[t];
                logits[t] = if l > 0.0 { l / r } else { l * r };
            }
        }
        for &t in prompt.iter().chain(generated) {
            seen[t as usize] = false;
        }
    }
    if s.frequency_penalty != 0.0 {
        for &t in generated {
            logits[t as usize] -= s.frequency_penalty;
        }
    }
    if s.presence_penalty != 0.0 {
        for &t in generated {
            let t = t as usize;
            if !seen[t] {
                seen[t] = true;
                logits[t] -= s.presence_penalty;
            }
        }
        for &t in generated {
            seen[t as usize] = false;
        }
    }
}

/// SplitMix64: the next number of a sequence's random stream.
pub(crate) fn next_u64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Draws a token from `softmax(logits / temperature)`, restricted as the
/// module's step 3 says.
pub fn sample(logits: &[f32], s: &Sampling, state: &mut u64) -> u32 {
    sample_with(logits, s, state, &mut Vec::new())
}

/// How many of the sorted candidates `p` (unnormalised probabilities, best
/// first) survive `min_p`, then `top_k`, then `top_p`.
fn kept(p: &[(u32, f64)], s: &Sampling) -> usize {
    let mut keep = p.len();
    if s.min_p > 0.0 {
        let floor = p[0].1 * f64::from(s.min_p);
        keep = p.iter().take_while(|x| x.1 >= floor).count().max(1);
    }
    if s.top_k > 0 {
        keep = keep.min(s.top_k as usize);
    }
    let top_p = if s.top_p <= 0.0 {
        1.0
    } else {
        f64::from(s.top_p)
    };
    if top_p < 1.0 {
        let total: f64 = p[..keep].iter().map(|x| x.1).sum();
        let mut acc = 0.0;
        for (i, x) in p[..keep].iter().enumerate() {
            acc += x.1 / total;
            if acc >= top_p {
                keep = i + 1;
                break;
            }
        }
    }
    keep
}

/// [`sample`] with a reusable buffer for the probabilities.
pub fn sample_with(logits: &[f32], s: &Sampling, state: &mut u64, p: &mut Vec<(u32, f64)>) -> u32 {
    let t = s.temperature.max(1e-6);
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    p.clear();
    p.extend(
        logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, (f64::from(l - max) / f64::from(t)).exp())),
    );
    // A total order (ties by id), so the unstable sort is deterministic.
    p.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let p = &p[..kept(p, s)];
    let mass: f64 = p.iter().map(|x| x.1).sum();
    let u = (next_u64(state) >> 11) as f64 / (1u64 << 53) as f64 * mass;
    let mut acc = 0.0;
    for x in p {
        acc += x.1;
        if u < acc {
            return x.0;
        }
    }
    p[p.len() - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn penalised(s: &Sampling, prompt: &[u32], generated: &[u32], stop: &[u32]) -> Vec<f32> {
        let mut l = vec![2.0, -1.0, 0.5, 3.0, -2.0];
        let mut seen = vec![false; l.len()];
        apply_penalties(&mut l, s, prompt, generated, stop, &mut seen);
        assert!(seen.iter().all(|&x| !x), "the scratch is left clear");
        l
    }

    #[test]
    fn neutral_values_leave_the_logits_alone() {
        let s = Sampling::default();
        assert!(!s.processes(0, &[1]));
        assert_eq!(
            penalised(&s, &[0, 1], &[2, 2], &[4]),
            [2.0, -1.0, 0.5, 3.0, -2.0]
        );
        assert_eq!(s.check(), None);
    }

    #[test]
    fn repetition_divides_positive_and_multiplies_negative_logits_once_per_token() {
        let s = Sampling {
            repetition_penalty: 2.0,
            ..Sampling::default()
        };
        // Token 0 (2.0) in the prompt, 1 (-1.0) in the prompt twice and the
        // output, 3 (3.0) in the output; 2 and 4 unseen.
        assert_eq!(
            penalised(&s, &[0, 1, 1], &[3, 1], &[]),
            [1.0, -2.0, 0.5, 1.5, -2.0]
        );
        let s = Sampling {
            repetition_penalty: 0.5,
            ..Sampling::default()
        };
        assert_eq!(penalised(&s, &[0], &[1], &[]), [4.0, -0.5, 0.5, 3.0, -2.0]);
    }

    #[test]
    fn frequency_counts_and_presence_does_not_and_neither_sees_the_prompt() {
        let s = Sampling {
            frequency_penalty: 0.5,
            ..Sampling::default()
        };
        // Token 2 out three times, 4 once; 0 only in the prompt.
        assert_eq!(
            penalised(&s, &[0], &[2, 4, 2, 2], &[]),
            [2.0, -1.0, -1.0, 3.0, -2.5]
        );
        let s = Sampling {
            presence_penalty: 0.5,
            ..Sampling::default()
        };
        assert_eq!(
            penalised(&s, &[0], &[2, 4, 2, 2], &[]),
            [2.0, -1.0, 0.0, 3.0, -2.5]
        );
        let s = Sampling {
            presence_penalty: -1.0,
            frequency_penalty: 1.0,
            ..Sampling::default()
        };
        // Both: token 2 gets -3 + 1, token 4 gets -1 + 1.
        assert_eq!(
            penalised(&s, &[], &[2, 4, 2, 2], &[]),
            [2.0, -1.0, -1.5, 3.0, -2.0]
        );
    }

    #[test]
    fn min_tokens_bars_the_stop_tokens_until_enough_are_out() {
        let s = Sampling {
            min_tokens: 2,
            ..Sampling::default()
        };
        assert!(s.processes(1, &[3]));
        assert!(!s.processes(2, &[3]));
        assert!(!s.processes(0, &[]));
        let l = penalised(&s, &[], &[1], &[3, 99]);
        assert_eq!(l[3], f32::NEG_INFINITY);
        assert_eq!(l[..3], [2.0, -1.0, 0.5]);
        assert_eq!(penalised(&s, &[], &[1, 1], &[3])[3], 3.0);
    }

    /// Probabilities (unnormalised, best first) of logits ln(8), ln(4),
    /// ln(2), ln(1): 8, 4, 2, 1 out of 15.
    fn candidates() -> Vec<(u32, f64)> {
        vec![(7, 8.0), (3, 4.0), (5, 2.0), (1, 1.0)]
    }

    #[test]
    fn min_p_then_top_k_then_top_p_cut_the_candidates() {
        let base = Sampling {
            temperature: 1.0,
            ..Sampling::default()
        };
        let p = candidates();
        assert_eq!(kept(&p, &base), 4);
        // min_p 0.25: at least 2 of the best's 8.
        assert_eq!(
            kept(
                &p,
                &Sampling {
                    min_p: 0.25,
                    ..base
                }
            ),
            3
        );
        assert_eq!(kept(&p, &Sampling { min_p: 1.0, ..base }), 1);
        assert_eq!(kept(&p, &Sampling { top_k: 2, ..base }), 2);
        // top_p over what is left: 8/12 < 0.7 <= 12/12 with top_k 2.
        let s = Sampling {
            top_k: 2,
            top_p: 0.7,
            ..base
        };
        assert_eq!(kept(&p, &s), 2);
        // Without top_k, 0.7 of 15 needs 8 + 4 too; 0.5 only the first.
        assert_eq!(kept(&p, &Sampling { top_p: 0.7, ..base }), 2);
        assert_eq!(kept(&p, &Sampling { top_p: 0.5, ..base }), 1);
    }

    #[test]
    fn sampling_draws_only_what_the_cuts_keep_and_in_proportion() {
        let logits = [0.0f32, 1.0, 3.0_f32.ln() + 1.0, -30.0];
        let s = Sampling {
            temperature: 1.0,
            top_k: 2,
            seed: 1,
            ..Sampling::default()
        };
        let mut state = 5;
        let mut counts = [0usize; 4];
        let n = 20_000;
        for _ in 0..n {
            counts[sample(&logits, &s, &mut state) as usize] += 1;
        }
        // Tokens 2 and 1 survive top-k, in the ratio 3 : 1.
        assert_eq!(counts[0] + counts[3], 0, "{counts:?}");
        let share = counts[2] as f64 / n as f64;
        assert!((share - 0.75).abs() < 0.02, "{counts:?}");
    }

    #[test]
    fn out_of_range_knobs_are_named() {
        let bad = [
            (
                Sampling {
                    min_p: 1.5,
                    ..Sampling::default()
                },
                "min_p",
            ),
            (
                Sampling {
                    repetition_penalty: 0.0,
                    ..Sampling::default()
                },
                "repetition_penalty",
            ),
            (
                Sampling {
                    presence_penalty: 3.0,
                    ..Sampling::default()
                },
                "presence_penalty",
            ),
            (
                Sampling {
                    frequency_penalty: f32::NAN,
                    ..Sampling::default()
                },
                "frequency_penalty",
            ),
        ];
        for (s, name) in bad {
            assert!(s.check().unwrap().starts_with(name), "{name}");
        }
    }
}
