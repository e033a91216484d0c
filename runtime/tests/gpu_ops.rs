//! Each GPU kernel against the CPU reference kernels (`matformer::cpu::reference`, f64
//! accumulation) over random shapes, including sizes that are not multiples of the workgroup
//! sizes, with the named [`Tolerance::KERNEL`] tier (f32 arithmetic; only summation order and
//! rounding differ; f16 weights are rounded before the reference sees them). The matrix
//! products run on every weight path the adapter has: packed (f32 arithmetic, `KERNEL`) and
//! native f16 (f16 products, [`F16_KERNEL_TOLERANCE`]).
//!
//! No adapter: the tests print "skipping: no GPU adapter (...)" and pass, except in CI
//! (`CI=true`), where they fail.
#![cfg(feature = "gpu")]

mod gpu_common;

use half::f16;
use matformer::cpu::{self, reference, Tolerance};
use matformer::gpu::{OpRunner, WeightFormat, WeightPath, F16_KERNEL_TOLERANCE};

fn runner_or_skip() -> Option<OpRunner> {
    gpu_common::or_skip(OpRunner::new(None), "GPU op runner")
}

/// Deterministic values in [-scale, scale).
fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn check(what: &str, tol: Tolerance, expected: &[f32], actual: &[f32]) {
    if let Err(m) = tol.check(expected, actual) {
        panic!("{what}: {m}");
    }
}

#[test]
fn matmul_gemv_and_gemm_match_reference() {
    let Some(mut r) = runner_or_skip() else { return };
    let paths = r.available_weight_paths();
    println!("weight paths on {}: {paths:?}", r.adapter().name);
    for path in paths {
        r.set_weight_path(path).expect("available path");
        // GEMV row groups per workgroup: 64 is the CPU-adapter choice, 4 the GPU one, 1 the
        // extreme; rows per thread of the packed GEMV: 4 on CPU adapters, 1 on GPUs, and 2.
        // The packed CPU-adapter kernels (`gemm_rows`, `gemv_t_split` + `gemv_t_reduce`) and the
        // GPU ones.
        for (gemv_rows, rpt, row_kernels) in [(64, 4, true), (64, 1, false), (4, 1, true), (4, 2, false), (1, 4, true)]
        {
            r.set_gemv_rows(gemv_rows).expect("valid rows");
            r.set_gemv_rows_per_thread(rpt).expect("valid rows per thread");
            r.set_row_kernels(row_kernels);
            matmul_cases(&r, path, gemv_rows, rpt, row_kernels);
        }
    }
    assert!(r.set_gemv_rows(3).is_err() && r.set_gemv_rows(128).is_err());
    assert!(r.set_gemv_rows_per_thread(3).is_err() && r.set_gemv_rows_per_thread(0).is_err());
}

#[test]
fn packed64_gemv_equals_the_packed_gemv() {
    // Same f32 arithmetic in the same order, only wider loads (and, in the subgroup variant,
    // activations shared across the subgroup): the decode GEMV of the packed64 path must give
    // the packed path's results bit for bit.
    let Some(mut r) = runner_or_skip() else { return };
    if !r.available_weight_paths().contains(&WeightPath::Packed64) {
        println!("skipping: {} has no SHADER_INT64", r.adapter().name);
        return;
    }
    // With 8-invocation subgroups (lavapipe) the paired kernel runs both with the activations
    // broadcast across the subgroup (`matmul_gemv_u64_sg.wgsl`, the default there) and without.
    let sg8 = r.subgroup_size() == Some(8);
    println!("subgroup size {:?}: subgroup GEMV {}", r.subgroup_size(), if sg8 { "tested" } else { "not available" });
    let runs: Vec<(WeightPath, bool)> = [(WeightPath::Packed, false), (WeightPath::Packed64, false)]
        .into_iter()
        .chain(sg8.then_some((WeightPath::Packed64, true)))
        .collect();
    let runs = runs.as_slice();
    // Odd and even units per row (the paired 32-byte-load kernels need even), one and two
    // column blocks of the split transposed GEMV.
    let shapes = [(1usize, 1usize), (37, 19), (130, 67), (300, 1030), (257, 2048), (300, 2064)];
    for (si, &(rows, cols)) in shapes.iter().enumerate() {
        let w: Vec<f32> = random(rows * cols, si as u64 + 3, 0.5).iter().map(|&v| f16::from_f32(v).to_f32()).collect();
        for transposed in [false, true] {
            let x = random(if transposed { rows } else { cols }, si as u64 + 9, 1.0);
            for rpt in [1, 2, 4] {
                r.set_gemv_rows_per_thread(rpt).expect("valid rows per thread");
                let mut got = Vec::new();
                for &(path, subgroup) in runs {
                    r.set_weight_path(path).expect("available path");
                    if path == WeightPath::Packed64 {
                        r.set_subgroup_gemv(subgroup).expect("subgroup GEMV where subgroups are 8 wide");
                    }
                    got.push(r.matmul(&w, rows, cols, WeightFormat::F16, &x, 1, transposed, None).expect("gemv"));
                }
                for (g, &(path, subgroup)) in got.iter().zip(runs).skip(1) {
                    let what = format!(
                        "{path} (subgroup GEMV {subgroup}) vs packed {rows}x{cols} transposed={transposed} rpt={rpt}"
                    );
                    check(&what, Tolerance::EXACT, &got[0], g);
                }
            }
        }
    }
}

#[test]
fn f16_path_is_refused_without_shader_f16() {
    let Some(mut r) = runner_or_skip() else { return };
    let has_f16 = r.adapter().shader_f16;
    assert_eq!(r.set_weight_path(WeightPath::F16).is_ok(), has_f16);
    assert_eq!(r.available_weight_paths().contains(&WeightPath::F16), has_f16);
    r.set_weight_path(WeightPath::Packed).expect("packed runs everywhere");
    assert_eq!(r.weight_path(), WeightPath::Packed);
}

fn matmul_cases(r: &OpRunner, path: WeightPath, gemv_rows: u32, rpt: u32, row_kernels: bool) {
    // (rows, cols, tokens): odd sizes, sizes around the tile sizes, one token (GEMV) and many (GEMM).
    let shapes = [
        (1, 1, 1),
        (5, 3, 1),
        (37, 19, 1),
        (130, 67, 1),
        (64, 64, 1),
        (70, 45, 3),
        (129, 33, 17),
        (3, 300, 2),
        (65, 129, 16),
        (67, 41, 7),
        (19, 257, 33),
        // 129 column units: two workgroups of the GPU transposed GEMV, one unit past.
        (300, 1030, 1),
        // 258 column units (even: the packed64 paired kernels): two column blocks of the
        // CPU-adapter split transposed GEMV, 3 slabs of its 300 rows.
        (300, 2064, 1),
        (40, 1030, 3),
    ];
    for (si, &(rows, cols, t)) in shapes.iter().enumerate() {
        let (rows, cols, t): (usize, usize, usize) = (rows, cols, t);
        for format in [WeightFormat::F16, WeightFormat::F32] {
            for transposed in [false, true] {
                // 2048-byte weight chunks split every matrix here into several row chunks (the
                // wide shapes, whose padded rows exceed 2048 bytes, run unchunked only).
                let elem = if format == WeightFormat::F32 { 4 } else { 2 };
                let row_bytes = (cols.div_ceil(8) * 8 * elem) as u64;
                for max_binding in [None, Some(2048u64)].into_iter().filter(|m| m.is_none_or(|m| row_bytes <= m)) {
                    let k = if transposed { rows } else { cols };
                    let seed = si as u64 * 31 + u64::from(transposed);
                    let mut w = random(rows * cols, seed, 1.0 / (k as f32).sqrt());
                    if format == WeightFormat::F16 {
                        w.iter_mut().for_each(|v| *v = f16::from_f32(*v).to_f32());
                    }
                    let x = random(t * k, seed + 7, 1.0);
                    let got = r.matmul(&w, rows, cols, format, &x, t, transposed, max_binding).expect("gpu matmul");
                    let expected: Vec<f32> = x
                        .chunks_exact(k)
                        .flat_map(|xr| {
                            if transposed {
                                reference::matvec_transposed(&w, rows, cols, xr)
                            } else {
                                reference::matvec(&w, rows, cols, xr)
                            }
                        })
                        .collect();
                    let what = format!(
                        "matmul {rows}x{cols} t={t} {format:?} on the {path} path, transposed={transposed} max_binding={max_binding:?} gemv_rows={gemv_rows} rpt={rpt} row_kernels={row_kernels}"
                    );
                    // f32 weights always run the packed kernels' f32 variant.
                    let tol = if path == WeightPath::F16 && format == WeightFormat::F16 {
                        F16_KERNEL_TOLERANCE
                    } else {
                        Tolerance::KERNEL
                    };
                    check(&what, tol, &expected, &got);
                }
            }
        }
    }
}

#[test]
fn norms_match_reference() {
    let Some(r) = runner_or_skip() else { return };
    for (i, &(rows, cols)) in [(1, 1), (2, 7), (3, 64), (1, 100), (5, 333)].iter().enumerate() {
        let x = random(rows * cols, i as u64 + 1, 3.0);
        let w: Vec<f32> = random(cols, i as u64 + 50, 0.2).iter().map(|v| 1.0 + v).collect();
        let b = random(cols, i as u64 + 90, 0.1);
        let rms: Vec<f32> = x.chunks_exact(cols).flat_map(|xr| reference::rms_norm(xr, &w, 1e-5)).collect();
        check(&format!("rmsnorm {rows}x{cols}"), Tolerance::KERNEL, &rms, &r.norm(&x, &w, None, 1e-5).expect("rms"));
        let ln: Vec<f32> = x.chunks_exact(cols).flat_map(|xr| reference::layer_norm(xr, &w, &b, 1e-5)).collect();
        check(
            &format!("layernorm {rows}x{cols}"),
            Tolerance::KERNEL,
            &ln,
            &r.norm(&x, &w, Some(&b), 1e-5).expect("ln"),
        );
    }
}

#[test]
fn rope_matches_reference() {
    let Some(r) = runner_or_skip() else { return };
    for (i, &(t, nh, nkv, hd, pos0)) in
        [(1, 1, 1, 2, 0), (3, 4, 2, 10, 5), (7, 3, 1, 64, 30), (2, 2, 2, 6, 100)].iter().enumerate()
    {
        let q = random(t * nh * hd, i as u64 + 3, 1.0);
        let k = random(t * nkv * hd, i as u64 + 4, 1.0);
        let got = r.rope(&q, &k, t, nh, nkv, hd, pos0, 10000.0).expect("rope");
        let mut expected = Vec::new();
        for (x, heads) in [(&q, nh), (&k, nkv)] {
            for tok in 0..t {
                for h in 0..heads {
                    let b = (tok * heads + h) * hd;
                    expected.extend(reference::rope(&x[b..b + hd], pos0 + tok, 10000.0));
                }
            }
        }
        // The rotated q and key-cache rows, then the value-cache rows: an exact copy of the
        // values (k is passed as the values).
        let (rotated, values) = got.split_at(q.len() + k.len());
        check(&format!("rope t={t} heads={nh}/{nkv} hd={hd} pos0={pos0}"), Tolerance::KERNEL, &expected, rotated);
        assert!(
            values.iter().map(|v| v.to_bits()).eq(k.iter().map(|v| v.to_bits())),
            "rope t={t} heads={nh}/{nkv} hd={hd} pos0={pos0}: value-cache rows are not an exact copy of v"
        );
    }
}

#[test]
fn attention_matches_reference() {
    let Some(r) = runner_or_skip() else { return };
    for (i, &(t, nh, nkv, hd, pos0)) in
        [(1, 1, 1, 4, 0), (1, 4, 2, 16, 9), (5, 6, 2, 10, 0), (3, 2, 1, 64, 70), (17, 3, 3, 8, 2)].iter().enumerate()
    {
        let kv = nkv * hd;
        let n = pos0 + t;
        let q = random(t * nh * hd, i as u64 + 11, 1.0);
        let keys = random(n * kv, i as u64 + 12, 1.0);
        let values = random(n * kv, i as u64 + 13, 1.0);
        let got = r.attention(&q, &keys, &values, t, nh, nkv, hd, pos0).expect("attention");
        let mut expected = Vec::new();
        for tok in 0..t {
            for h in 0..nh {
                let off = (h / (nh / nkv)) * hd;
                let ks: Vec<Vec<f32>> =
                    (0..=pos0 + tok).map(|j| keys[j * kv + off..j * kv + off + hd].to_vec()).collect();
                let vs: Vec<Vec<f32>> =
                    (0..=pos0 + tok).map(|j| values[j * kv + off..j * kv + off + hd].to_vec()).collect();
                let qb = (tok * nh + h) * hd;
                expected.extend(reference::attention(&q[qb..qb + hd], &ks, &vs));
            }
        }
        check(&format!("attention t={t} heads={nh}/{nkv} hd={hd} pos0={pos0}"), Tolerance::KERNEL, &expected, &got);
    }
}

#[test]
fn ffn_activations_match_reference() {
    let Some(r) = runner_or_skip() else { return };
    for (i, &(t, width)) in [(1, 1), (2, 63), (3, 65), (4, 200)].iter().enumerate() {
        let up = random(t * width, i as u64 + 21, 4.0);
        let gate = random(t * width, i as u64 + 22, 4.0);
        for gelu in [false, true] {
            let act = if gelu { reference::gelu_tanh } else { reference::silu };
            let plain: Vec<f32> = up.iter().map(|&u| act(u)).collect();
            check(
                &format!("act t={t} w={width} gelu={gelu}"),
                Tolerance::KERNEL,
                &plain,
                &r.ffn_act(&up, None, width, gelu).expect("act"),
            );
            let gated: Vec<f32> = up.iter().zip(&gate).map(|(&u, &g)| u * act(g)).collect();
            let got = r.ffn_act(&up, Some(&gate), width, gelu).expect("gated act");
            check(&format!("gated act t={t} w={width} gelu={gelu}"), Tolerance::KERNEL, &gated, &got);
        }
    }
}

#[test]
fn argmax_matches_cpu_including_ties_and_nans() {
    let Some(r) = runner_or_skip() else { return };
    let mut cases =
        vec![vec![1.0], vec![0.5, 2.0, 2.0, -1.0], vec![f32::NAN, 3.0, f32::NAN, 3.0], vec![f32::NEG_INFINITY; 5]];
    cases.push(vec![f32::NAN; 3]);
    for n in [255, 256, 257, 1000, 32_000] {
        let mut v = random(n, n as u64, 10.0);
        v[n / 3] = 11.0;
        v[n - 1] = 11.0;
        cases.push(v);
    }
    for logits in &cases {
        assert_eq!(r.argmax(logits).expect("argmax"), cpu::argmax(logits), "argmax of {} logits", logits.len());
    }
}

#[test]
fn embedding_gathers_rows_across_chunks() {
    let Some(r) = runner_or_skip() else { return };
    let (rows, cols) = (300, 37);
    let table = random(rows * cols, 5, 1.0);
    let tokens = [0u32, 299, 17, 17, 150, 1];
    for max_binding in [None, Some(256)] {
        let got = r.embedding(&table, rows, cols, &tokens, max_binding).expect("embedding");
        let expected: Vec<f32> = tokens
            .iter()
            .flat_map(|&t| table[t as usize * cols..(t as usize + 1) * cols].iter().map(|&v| f16::from_f32(v).to_f32()))
            .collect();
        check("embedding", Tolerance::EXACT, &expected, &got);
    }
}
