//! The sampler against independently computed distributions: a chi-square goodness-of-fit test
//! per setting (temperature, top-k, top-p, min-p, penalties, their combination, and the
//! candidate-list path with its fall-back to full logits), determinism per seed, greedy equal
//! to `cpu::argmax`, and out-of-range parameters rejected.
//!
//! Chi-square: `DRAWS` draws on a small vocabulary with known logits; the statistic
//! `sum (observed - expected)^2 / expected` over the tokens the setting keeps (tokens it drops
//! must never be drawn) is compared with the critical value of the chi-square distribution at
//! significance 0.001 for `support - 1` degrees of freedom (`CHI2_CRIT_001`, from the standard
//! table). The seeds are fixed, so each test is deterministic; a correct sampler fails a given
//! case with probability 0.001 over the choice of seed.

use matformer::cpu::argmax;
use matformer::sampling::{Candidates, LogitTransform, Sampler, SamplingParams, SplitMix64, MAX_CANDIDATES};

const DRAWS: usize = 40_000;

/// Critical values of chi-square at significance 0.001, for 1 to 10 degrees of freedom.
const CHI2_CRIT_001: [f64; 10] = [10.828, 13.816, 16.266, 18.467, 20.515, 22.458, 24.322, 26.124, 27.877, 29.588];

const LOGITS: [f32; 8] = [2.0, 1.2, 0.9, 0.5, 0.0, -0.4, -1.0, -2.5];

fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
    let mut p = SamplingParams { temperature: 1.0, seed: Some(7), ..SamplingParams::default() };
    f(&mut p);
    p
}

/// The reference distribution, written from the definitions (f64, sorting by value).
fn expected(p: &SamplingParams, logits: &[f32], observed: &[u32]) -> Vec<f64> {
    let n = logits.len();
    let mut v: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
    for (t, vt) in v.iter_mut().enumerate() {
        let c = observed.iter().filter(|&&o| o as usize == t).count();
        if c > 0 {
            let rp = p.repetition_penalty as f64;
            *vt = if *vt > 0.0 { *vt / rp } else { *vt * rp };
            *vt -= c as f64 * p.frequency_penalty as f64 + p.presence_penalty as f64;
        }
    }
    let z: Vec<f64> = v.iter().map(|x| x / p.temperature as f64).collect();
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| z[b].partial_cmp(&z[a]).unwrap().then(a.cmp(&b)));
    let mut keep = idx.clone();
    if p.top_k > 0 {
        keep.truncate(p.top_k as usize);
    }
    let softmax = |set: &[usize]| -> Vec<f64> {
        let m = z[set[0]];
        let e: Vec<f64> = set.iter().map(|&i| (z[i] - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.into_iter().map(|x| x / s).collect()
    };
    if p.top_p < 1.0 {
        let probs = softmax(&keep);
        let mut cum = 0.0;
        let mut m = keep.len();
        for (j, q) in probs.iter().enumerate() {
            cum += q;
            if cum >= p.top_p as f64 {
                m = j + 1;
                break;
            }
        }
        keep.truncate(m);
    }
    if p.min_p > 0.0 {
        let probs = softmax(&keep);
        let max = probs[0];
        let m = probs.iter().filter(|&&q| q >= p.min_p as f64 * max).count();
        keep.truncate(m);
    }
    let probs = softmax(&keep);
    let mut out = vec![0.0; n];
    for (&i, q) in keep.iter().zip(probs) {
        out[i] = q;
    }
    out
}

/// Chi-square statistic over the support of `expected`; panics on a draw outside it.
fn chi_square(counts: &[usize], expected: &[f64], draws: usize, what: &str) {
    let mut stat = 0.0;
    let mut support = 0;
    for (t, (&c, &q)) in counts.iter().zip(expected).enumerate() {
        if q == 0.0 {
            assert_eq!(c, 0, "{what}: token {t} is outside the kept set but was drawn {c} times");
            continue;
        }
        support += 1;
        let e = q * draws as f64;
        stat += (c as f64 - e).powi(2) / e;
    }
    assert!(support >= 2, "{what}: a test case needs at least two kept tokens");
    let crit = CHI2_CRIT_001[support - 2];
    assert!(
        stat < crit,
        "{what}: chi-square {stat:.2} >= {crit} (df {}, significance 0.001); counts {counts:?}, expected {expected:?}",
        support - 1
    );
}

fn check_distribution(p: SamplingParams, logits: &[f32], observed: &[u32], what: &str) {
    let exp = expected(&p, logits, observed);
    let mut s = Sampler::new(p).expect("valid params");
    s.observe_all(observed);
    let mut counts = vec![0usize; logits.len()];
    for _ in 0..DRAWS {
        counts[s.sample_logits(logits) as usize] += 1;
    }
    chi_square(&counts, &exp, DRAWS, what);
}

#[test]
fn temperature_matches_the_softmax() {
    check_distribution(params(|p| p.temperature = 0.7), &LOGITS, &[], "temperature 0.7");
    check_distribution(params(|p| p.temperature = 1.8), &LOGITS, &[], "temperature 1.8");
}

#[test]
fn top_k_keeps_the_k_most_likely() {
    check_distribution(params(|p| p.top_k = 3), &LOGITS, &[], "top-k 3");
}

#[test]
fn top_p_keeps_the_nucleus() {
    // Softmax of LOGITS at T = 1: 0.436, 0.196, 0.145, 0.097, ... -> the nucleus at 0.75 is 3.
    check_distribution(params(|p| p.top_p = 0.75), &LOGITS, &[], "top-p 0.75");
}

#[test]
fn min_p_keeps_tokens_near_the_most_likely() {
    check_distribution(params(|p| (p.min_p, p.temperature) = (0.2, 1.3)), &LOGITS, &[], "min-p 0.2");
}

#[test]
fn penalties_shift_the_observed_tokens() {
    let p = params(|p| (p.repetition_penalty, p.frequency_penalty, p.presence_penalty) = (1.5, 0.3, 0.2));
    check_distribution(p, &LOGITS, &[0, 0, 2, 6, 6, 6], "penalties");
    // A repetition penalty below 1 raises observed tokens.
    check_distribution(params(|p| p.repetition_penalty = 0.6), &LOGITS, &[3, 7], "repetition penalty 0.6");
}

#[test]
fn truncations_and_penalties_combine() {
    let p = params(|p| {
        (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty) = (0.8, 6, 0.95, 0.05, 1.2);
    });
    check_distribution(p, &LOGITS, &[1], "top-k 6, top-p 0.95, min-p 0.05, T 0.8, rp 1.2");
}

/// A vocabulary of 600: 6 likely tokens (mass ~44%) and a long flat tail (~56%) that a short
/// candidate list cannot hold, so some settings need the full logits.
fn long_tail() -> Vec<f32> {
    (0..600).map(|i| if i < 6 { 4.0 - i as f32 * 0.5 } else { -1.0 - (i % 7) as f32 * 0.1 }).collect()
}

/// `(top k, log-sum-exp)` of processed logits as a device computes them.
fn candidates(processed: &[f32], k: usize, temperature: f32) -> Candidates {
    let mut all: Vec<(u32, f32)> = processed.iter().enumerate().map(|(i, &v)| (i as u32, v)).collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let t = temperature as f64;
    let m = all[0].1 as f64 / t;
    let lse = m + processed.iter().map(|&v| (v as f64 / t - m).exp()).sum::<f64>().ln();
    all.truncate(k);
    // Any order: the device writes them in id order.
    all.sort_by_key(|c| c.0);
    Candidates { pairs: all, log_sum_exp: lse as f32 }
}

/// The processed logits and their top `k` candidates for `s`'s observed tokens.
fn device_side(s: &Sampler, logits: &[f32], k: usize) -> (Vec<f32>, Candidates) {
    let tr = s.logit_transform();
    let mut processed = logits.to_vec();
    for &(t, c) in tr.counts {
        processed[t as usize] = tr.penalize(processed[t as usize], c);
    }
    let c = candidates(&processed, k, tr.temperature);
    (processed, c)
}

/// Samples with candidates first and the full logits when they do not decide (the GPU
/// session's loop); `true` when it fell back.
fn sample_two_stage(s: &mut Sampler, processed: &[f32], c: &Candidates) -> (u32, bool) {
    match s.sample_from_candidates(&c.pairs, c.log_sum_exp) {
        Some(t) => (t, false),
        None => (s.sample_processed_logits(processed), true),
    }
}

/// Draws per setting on the 600-token vocabulary (a fall-back sorts all of it; kept small for
/// debug-build test time).
const TAIL_DRAWS: usize = 8_000;

#[test]
fn candidate_path_matches_the_distribution_and_falls_back() {
    let logits = long_tail();
    for (p, what, some) in [
        (params(|_| {}), "temperature 1 (draws in the tail fall back)", Some(true)),
        (params(|p| p.top_p = 0.3), "top-p 0.3 (nucleus inside the list)", Some(false)),
        (params(|p| p.top_p = 0.9), "top-p 0.9 (nucleus beyond the list)", None),
        (params(|p| p.min_p = 0.01), "min-p 0.01 (cut inside the list)", Some(false)),
        (params(|p| p.min_p = 0.003), "min-p 0.003 (cut beyond the list)", None),
        (params(|p| (p.presence_penalty, p.top_k) = (1.0, 4)), "presence 1, top-k 4", Some(false)),
    ] {
        let observed = [0u32, 1];
        let mut s = Sampler::new(p).expect("valid");
        s.observe_all(&observed);
        let exp = expected(&p, &logits, &observed);
        let (processed, c) = device_side(&s, &logits, 16);
        let mut counts = vec![0usize; logits.len()];
        let mut fallbacks = 0;
        for _ in 0..TAIL_DRAWS {
            let (t, fb) = sample_two_stage(&mut s, &processed, &c);
            counts[t as usize] += 1;
            fallbacks += usize::from(fb);
        }
        // The tail as one bin (its tokens are many and individually rare).
        let fold = |v: &[f64]| -> Vec<f64> {
            let mut out = v[..6].to_vec();
            out.push(v[6..].iter().sum());
            out
        };
        let c: Vec<usize> = counts[..6].iter().copied().chain([counts[6..].iter().sum()]).collect();
        chi_square(&c, &fold(&exp), TAIL_DRAWS, what);
        println!("{what}: {fallbacks} fall-backs in {TAIL_DRAWS} draws");
        // Some(true): some but not all draws fall back; Some(false): none; None: all.
        match some {
            Some(true) => assert!(fallbacks > 0 && fallbacks < TAIL_DRAWS, "{what}: {fallbacks} fall-backs"),
            Some(false) => assert_eq!(fallbacks, 0, "{what}"),
            None => assert_eq!(fallbacks, TAIL_DRAWS, "{what}"),
        }
    }
}

#[test]
fn candidates_and_full_logits_give_the_same_tokens_per_seed() {
    let base = long_tail();
    for p in [
        params(|_| {}),
        params(|p| (p.temperature, p.top_p) = (0.7, 0.9)),
        params(|p| (p.top_k, p.temperature) = (5, 1.5)),
        params(|p| p.min_p = 0.02),
        params(|p| (p.repetition_penalty, p.frequency_penalty, p.top_p) = (1.3, 0.4, 0.95)),
        params(|p| p.temperature = 0.0),
        params(|p| (p.temperature, p.presence_penalty) = (0.0, 2.0)),
    ] {
        let mut full = Sampler::new(p).expect("valid");
        let mut two = Sampler::new(p).expect("valid");
        let mut rng = SplitMix64::new(99);
        for step in 0..400 {
            // Logits that change every step, and a context that grows.
            let logits: Vec<f32> = base.iter().map(|&v| v + (rng.next_f64() as f32 - 0.5) * 0.8).collect();
            let a = full.sample_logits(&logits);
            let (processed, c) = device_side(&two, &logits, 8);
            let (b, _) = sample_two_stage(&mut two, &processed, &c);
            assert_eq!(a, b, "{p:?}: step {step}");
            full.observe(a);
            two.observe(b);
        }
    }
}

#[test]
fn same_seed_same_tokens_other_seed_other_tokens() {
    let run = |seed| {
        let mut s = Sampler::new(params(|p| (p.seed, p.top_p) = (Some(seed), 0.95))).expect("valid");
        (0..200).map(|_| s.sample_logits(&LOGITS)).collect::<Vec<u32>>()
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
    // Reseeding restarts the stream.
    let mut s = Sampler::new(params(|p| p.seed = Some(5))).expect("valid");
    let first: Vec<u32> = (0..50).map(|_| s.sample_logits(&LOGITS)).collect();
    s.reseed(5);
    let again: Vec<u32> = (0..50).map(|_| s.sample_logits(&LOGITS)).collect();
    assert_eq!(first, again);
}

#[test]
fn greedy_is_argmax_with_ties_to_the_lowest_id() {
    let mut s = Sampler::new(SamplingParams::default()).expect("default is valid");
    let mut rng = SplitMix64::new(3);
    for _ in 0..500 {
        // Coarse values: many ties.
        let logits: Vec<f32> = (0..40).map(|_| (rng.next_f64() * 6.0).floor() as f32).collect();
        assert_eq!(s.sample_logits(&logits), argmax(&logits));
        let c = candidates(&logits, 5, 1.0);
        assert_eq!(s.sample_from_candidates(&c.pairs, c.log_sum_exp), Some(argmax(&logits)));
    }
    assert_eq!(s.sample_logits(&[1.0, f32::NAN, 3.0, 3.0]), 2);
    assert_eq!(s.sample_logits(&[f32::NAN, f32::NAN]), argmax(&[f32::NAN, f32::NAN]));
    assert_eq!(s.sample_logits(&[f32::NEG_INFINITY; 3]), 0);
    assert_eq!(s.sample_logits(&[]), 0);
    assert_eq!(s.sample_from_candidates(&[], 0.0), None);
    // Greedy with a penalty: the argmax of the processed logits.
    let mut s = Sampler::new(params(|p| (p.temperature, p.repetition_penalty) = (0.0, 4.0))).expect("valid");
    s.observe(0);
    assert_eq!(s.sample_logits(&LOGITS), 1);
}

#[test]
fn sampling_never_picks_nan_or_negative_infinity() {
    let mut s = Sampler::new(params(|_| {})).expect("valid");
    let logits = [f32::NAN, 0.0, f32::NEG_INFINITY, -0.5];
    for _ in 0..2_000 {
        let t = s.sample_logits(&logits);
        assert!(t == 1 || t == 3, "drew {t}");
    }
}

#[test]
fn out_of_range_parameters_are_rejected_by_name() {
    let cases: [(&str, SamplingParams); 14] = [
        ("temperature", params(|p| p.temperature = -0.1)),
        ("temperature", params(|p| p.temperature = f32::NAN)),
        ("temperature", params(|p| p.temperature = f32::INFINITY)),
        ("top_p", params(|p| p.top_p = 0.0)),
        ("top_p", params(|p| p.top_p = 1.01)),
        ("top_p", params(|p| p.top_p = f32::NAN)),
        ("min_p", params(|p| p.min_p = 1.0)),
        ("min_p", params(|p| p.min_p = -0.01)),
        ("repetition_penalty", params(|p| p.repetition_penalty = 0.0)),
        ("repetition_penalty", params(|p| p.repetition_penalty = -1.0)),
        ("repetition_penalty", params(|p| p.repetition_penalty = f32::INFINITY)),
        ("frequency_penalty", params(|p| p.frequency_penalty = f32::NAN)),
        ("presence_penalty", params(|p| p.presence_penalty = f32::NEG_INFINITY)),
        ("presence_penalty", params(|p| p.presence_penalty = f32::INFINITY)),
    ];
    for (name, p) in cases {
        let e = p.validate().expect_err(name);
        assert_eq!(e.name, name);
        let msg = e.to_string();
        assert!(msg.contains(name) && msg.contains("out of range") && !msg.contains('\n'), "{msg}");
        assert!(Sampler::new(p).is_err());
    }
    assert!(SamplingParams::default().validate().is_ok());
    let edge = params(|p| (p.top_p, p.min_p, p.top_k, p.frequency_penalty) = (1.0, 0.0, u32::MAX, -2.0));
    assert!(edge.validate().is_ok());
}

#[test]
fn candidate_count_and_transform_follow_the_params() {
    let mut s = Sampler::new(params(|p| p.top_k = 40)).expect("valid");
    assert_eq!(s.candidate_count(), 40);
    s.observe_all(&[5, 3, 5]);
    assert_eq!(s.context_counts(), &[(3, 1), (5, 2)]);
    assert_eq!(s.count_of(5), 2);
    // No penalty: the device needs no counts.
    assert!(s.logit_transform().counts.is_empty());
    let s2 = Sampler::new(params(|p| (p.top_k, p.frequency_penalty) = (100_000, 0.5))).expect("valid");
    assert_eq!(s2.candidate_count(), MAX_CANDIDATES);
    let g = Sampler::new(SamplingParams::default()).expect("valid");
    assert_eq!(g.candidate_count(), 1);
    assert_eq!(g.logit_transform(), LogitTransform { temperature: 1.0, ..LogitTransform::IDENTITY });
    s.clear_context();
    assert!(s.context_counts().is_empty());
}
