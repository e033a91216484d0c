//! `matformer synth`: files in the real format with random weights at real model shapes, for
//! benchmarks at realistic size (no trained model of that size is needed).

use std::io::BufWriter;
use std::path::Path;

use anyhow::{bail, Context, Result};
use matformer::format::{
    self, Activation, Architecture, Gemma3nConfig, Metadata, NestingOrigin, NormKind, Positional, Provenance,
    Tokenizer, GEMMA3N_FAMILY,
};
use serde::Serialize;

use crate::onnx_source::default_level_names;
use crate::progress::Progress;

/// A named shape preset.
#[derive(Clone, Debug, Serialize)]
pub struct SynthPreset {
    /// Name used on the command line.
    pub name: &'static str,
    /// What it imitates.
    pub description: &'static str,
    /// Architecture.
    pub architecture: Architecture,
    /// Full FFN width (nested widths are h/8, h/4, h/2, h; for Gemma 3n h/2, h).
    pub ffn_width: u32,
    /// The Gemma 3n fields for a given layer count (`Some` for the real Gemma 3n presets,
    /// which write the full Gemma 3n tensor set with levels `half` and `full`).
    #[serde(skip)]
    pub gemma3n: Option<fn(u32) -> Gemma3nConfig>,
}

/// Gemma 3n E4B's text model: per-layer inputs of 256 from a 262144-row table, 4 AltUp
/// streams, LAuReL rank 64, a 512-token window on every layer but each fifth, the last 15
/// layers (of 35) sharing K/V, 0.95 activation sparsity on the first 10 layers, soft-cap 30.
/// With fewer layers (`--layers`), the shared tail shrinks in proportion.
fn e4b_gemma3n(n_layers: u32) -> Gemma3nConfig {
    gemma3n_pattern(n_layers, 256, 262_144, 64, 512, 15 * n_layers / 35, 10)
}

/// The tiny Gemma 3n for tests (10 layers: 4 and 9 full, the last 4 sharing K/V, sparsity on
/// layers 0-2).
fn tiny_gemma3n(n_layers: u32) -> Gemma3nConfig {
    gemma3n_pattern(n_layers, 16, 256, 8, 4, 4 * n_layers / 10, 3 * n_layers as usize / 10)
}

/// E4B's layer pattern (window on every layer but each fifth, the last 15 of 35 sharing K/V,
/// sparsity on the first 10) with tiny per-layer inputs, LAuReL and window, for
/// `gemma-3n-e4b-narrow`.
fn e4b_narrow_gemma3n(n_layers: u32) -> Gemma3nConfig {
    gemma3n_pattern(n_layers, 4, 256, 2, 8, 15 * n_layers / 35, 10)
}

/// A Gemma 3n config with full attention where `(i + 1) % 5 == 0`, `sparse` leading layers at
/// 0.95 and `kv_shared` sharing layers, reduced until every shared layer has an owner.
fn gemma3n_pattern(
    n_layers: u32,
    per_layer_dim: u32,
    per_layer_vocab: u32,
    laurel_rank: u32,
    sliding_window: u32,
    kv_shared: u32,
    sparse: usize,
) -> Gemma3nConfig {
    let n = n_layers as usize;
    let mut g = Gemma3nConfig {
        per_layer_dim,
        per_layer_vocab,
        altup_inputs: 4,
        altup_correct_scale: true,
        laurel_rank,
        sliding_window,
        sliding: (0..n).map(|i| (i + 1) % 5 != 0).collect(),
        rope_local_theta: 10_000.0,
        kv_shared_layers: kv_shared.min(n_layers.saturating_sub(1)),
        activation_sparsity: (0..n).map(|i| if i < sparse { 0.95 } else { 0.0 }).collect(),
        final_logit_softcap: Some(30.0),
    };
    while g.kv_shared_layers > 0 && (g.first_shared()..n).any(|i| g.kv_owner(i).is_none()) {
        g.kv_shared_layers -= 1;
    }
    g
}

#[allow(clippy::too_many_arguments)] // one positional row per preset reads as a table
fn arch(
    family: &str,
    d_model: u32,
    n_layers: u32,
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    vocab_size: u32,
    activation: Activation,
    rope_theta: f32,
) -> Architecture {
    Architecture {
        family: family.into(),
        d_model,
        n_layers,
        n_heads,
        n_kv_heads,
        head_dim,
        vocab_size,
        max_context: 4096,
        norm: NormKind::RmsNorm,
        norm_eps: 1e-5,
        activation,
        gated_ffn: true,
        positional: Positional::Rope,
        rope_theta,
        tied_embeddings: true,
    }
}

/// The built-in presets.
pub fn presets() -> Vec<SynthPreset> {
    vec![
        SynthPreset {
            name: "llama-3.2-1b",
            description: "Llama-3.2-1B shapes: d_model 2048, 16 layers, 32 heads / 8 KV heads, FFN 8192, 128256 vocab, tied (1.24B params)",
            architecture: arch("llama", 2048, 16, 32, 8, 64, 128_256, Activation::Silu, 500_000.0),
            ffn_width: 8192,
            gemma3n: None,
        },
        SynthPreset {
            name: "gemma-3n-e4b",
            description: "Gemma 3n E4B text model, every tensor at its real shape: d_model 2048, 35 layers, 8 heads / 2 KV heads of 256, FFN 16384 nested [8192, 16384], per-layer inputs 256 x 262144, AltUp 4, LAuReL 64, 262400 vocab (6.8B params; ~13.6 GB f16, ~3.8 GB q4)",
            architecture: Architecture {
                max_context: 32_768,
                norm_eps: 1e-6,
                ..arch(GEMMA3N_FAMILY, 2048, 35, 8, 2, 256, 262_400, Activation::GeluTanh, 1_000_000.0)
            },
            ffn_width: 16_384,
            gemma3n: Some(e4b_gemma3n),
        },
        SynthPreset {
            name: "gemma-3n-tiny",
            description: "A tiny Gemma 3n for tests: d_model 64, 10 layers, 4 heads / 2 KV heads of 16, FFN [64, 128], per-layer inputs 16 x 256, AltUp 4, LAuReL 8, window 4, 300 vocab",
            architecture: Architecture {
                max_context: 512,
                norm_eps: 1e-6,
                ..arch(GEMMA3N_FAMILY, 64, 10, 4, 2, 16, 300, Activation::GeluTanh, 1_000_000.0)
            },
            ffn_width: 128,
            gemma3n: Some(tiny_gemma3n),
        },
        SynthPreset {
            name: "gemma-3n-e4b-narrow",
            description: "Gemma 3n E4B's depth and FFN widths at a tiny width, so Google's E4B slices (e2b, e2.54b, ...) apply: d_model 8, 35 layers, 2 heads / 1 KV head of 4, FFN 16384 nested [8192, 16384], per-layer inputs 4 x 256, AltUp 4, LAuReL 2, window 8, 300 vocab (~37 MB f16)",
            architecture: Architecture {
                max_context: 512,
                norm_eps: 1e-6,
                ..arch(GEMMA3N_FAMILY, 8, 35, 2, 1, 4, 300, Activation::GeluTanh, 1_000_000.0)
            },
            ffn_width: 16_384,
            gemma3n: Some(e4b_narrow_gemma3n),
        },
        SynthPreset {
            name: "gemma-3n-e2b",
            description: "Gemma-3n-E2B-like shapes without Gemma's extras: d_model 2048, 30 layers, 8 heads / 2 KV heads of 256, FFN 8192, GeGLU, 262144 vocab (2.0B params)",
            architecture: arch("gemma3n-like", 2048, 30, 8, 2, 256, 262_144, Activation::GeluTanh, 1_000_000.0),
            ffn_width: 8192,
            gemma3n: None,
        },
        SynthPreset {
            name: "small",
            description: "A small model for quick runs: d_model 512, 8 layers, 8 heads / 4 KV heads, FFN 2048, 32000 vocab (~42M params)",
            architecture: arch("llama", 512, 8, 8, 4, 64, 32_000, Activation::Silu, 10_000.0),
            ffn_width: 2048,
            gemma3n: None,
        },
    ]
}

/// Options of `matformer synth`.
#[derive(Clone, Debug)]
pub struct SynthOptions {
    /// Preset name.
    pub preset: String,
    /// Override the number of layers.
    pub layers: Option<u32>,
    /// Storage dtype of each tensor (`--dtype`, `--dtype-override`).
    pub dtype: crate::dtype_plan::DTypePlan,
    /// Random seed.
    pub seed: u64,
}

/// Metadata of a synthetic file.
pub fn synth_metadata(opts: &SynthOptions) -> Result<Metadata> {
    let Some(p) = presets().into_iter().find(|p| p.name == opts.preset) else {
        let names: Vec<&str> = presets().iter().map(|p| p.name).collect();
        bail!("unknown synth preset `{}`; known: {}", opts.preset, names.join(", "));
    };
    let mut a = p.architecture.clone();
    if let Some(l) = opts.layers {
        if l == 0 {
            bail!("--layers must be at least 1");
        }
        if p.gemma3n.is_some() && l < 2 {
            bail!("--layers must be at least 2 for a Gemma 3n preset");
        }
        a.n_layers = l;
    }
    let h = p.ffn_width;
    let (widths, level_names) = match p.gemma3n {
        Some(_) => (vec![h / 2, h], vec!["half".to_string(), "full".to_string()]),
        None => (vec![h / 8, h / 4, h / 2, h], default_level_names(4)),
    };
    let mut meta = Metadata {
        ffn_widths: vec![widths; a.n_layers as usize],
        level_names,
        tokenizer: Tokenizer { kind: "bytes".into(), bos_id: Some(256), eos_id: Some(257) },
        provenance: Provenance {
            source_sha256: "synthetic".into(),
            source_name: format!("synth:{} seed {}", p.name, opts.seed),
            exporter: format!("matformer-export {}", env!("CARGO_PKG_VERSION")),
        },
        architecture: a,
        extra: Default::default(),
    };
    if let Some(g) = p.gemma3n {
        g(meta.architecture.n_layers).store(&mut meta);
    }
    // Synthetic files stand in for MatFormer-trained models (benchmarks of their shapes).
    meta.set_nesting(NestingOrigin::Trained);
    meta.validate().map_err(|e| anyhow::anyhow!("preset {}: {e}", p.name))?;
    Ok(meta)
}

/// splitmix64: a fast, well-mixed generator; one stream per (tensor, row) so the values do not
/// depend on how the writer chunks rows.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The length of the file [`synth`] would write, computed from the layout (no bytes
/// written): print it, and check the disk, before writing a large preset.
pub fn planned_len(opts: &SynthOptions) -> Result<u64> {
    let meta = synth_metadata(opts)?;
    let specs = opts.dtype.specs(&meta)?;
    let view = format::plan_layout(&meta, &specs).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(view.file_len)
}

/// Writes a synthetic file; returns its length. A failed write (a full disk) removes the
/// partial file.
pub fn synth(opts: &SynthOptions, out: &Path) -> Result<u64> {
    let meta = synth_metadata(opts)?;
    let specs = opts.dtype.specs(&meta)?;
    let file = std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut progress = Progress::new("synth");
    let seed = opts.seed;
    let len = format::write_file(
        BufWriter::with_capacity(1 << 20, file),
        &meta,
        &specs,
        |idx, rows, buf| {
            let spec = &specs[idx];
            let row_elems: u64 = spec.shape.iter().skip(1).product();
            let is_norm = spec.shape.len() == 1;
            // Uniform in [-a, a] with std 1/sqrt(fan_in): activations keep their scale.
            let a = (3.0f32 / row_elems.max(1) as f32).sqrt();
            let mut row = Vec::with_capacity(row_elems as usize);
            for r in rows {
                let mut st = seed ^ ((idx as u64) << 40) ^ r.wrapping_mul(0x2545_F491_4F6C_DD1D);
                row.clear();
                if is_norm {
                    row.push(1.0);
                } else {
                    row.extend((0..row_elems).map(|_| {
                        let u = (splitmix(&mut st) >> 40) as f32 / (1u64 << 24) as f32;
                        (2.0 * u - 1.0) * a
                    }));
                }
                matformer::quant::encode_row(spec.dtype, &row, buf)?;
            }
            Ok(())
        },
        |done, total| progress.update(done, total),
    )
    .map_err(|e| {
        let _ = std::fs::remove_file(out);
        anyhow::anyhow!("{e}")
    })?;
    progress.finish();
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use matformer::format::DType;

    fn opts(preset: &str, layers: Option<u32>, dtype: DType) -> SynthOptions {
        SynthOptions { preset: preset.into(), layers, dtype: dtype.into(), seed: 7 }
    }

    #[test]
    fn gemma3n_e4b_metadata_has_the_real_shapes() {
        let meta = synth_metadata(&opts("gemma-3n-e4b", None, DType::Q4_0)).unwrap();
        let g = Gemma3nConfig::from_metadata(&meta).unwrap().unwrap();
        let a = &meta.architecture;
        assert_eq!((a.family.as_str(), a.d_model, a.n_layers, a.vocab_size), ("gemma3n", 2048, 35, 262_400));
        assert_eq!((a.n_heads, a.n_kv_heads, a.head_dim, a.max_context), (8, 2, 256, 32_768));
        assert_eq!(meta.ffn_widths, vec![vec![8192, 16_384]; 35]);
        assert_eq!(meta.level_names, ["half", "full"]);
        assert_eq!((g.per_layer_dim, g.per_layer_vocab, g.laurel_rank, g.kv_shared_layers), (256, 262_144, 64, 15));
        assert_eq!(g.kv_producers(), vec![18, 19]);
        assert_eq!(g.activation_sparsity.iter().filter(|s| **s > 0.0).count(), 10);
        assert_eq!(meta.nesting(), NestingOrigin::Trained);
        // ~3.8 GB in q4_0, ~13.6 GB in f16.
        let q4 = planned_len(&opts("gemma-3n-e4b", None, DType::Q4_0)).unwrap();
        let f16 = planned_len(&opts("gemma-3n-e4b", None, DType::F16)).unwrap();
        assert!((3_500_000_000..4_200_000_000).contains(&q4), "{q4}");
        assert!((13_000_000_000..14_200_000_000).contains(&f16), "{f16}");
        // Fewer layers keep a valid sharing pattern.
        for l in [2, 5, 7, 20] {
            synth_metadata(&opts("gemma-3n-e4b", Some(l), DType::F16)).unwrap();
        }
    }

    #[test]
    fn gemma3n_tiny_writes_and_reads_back() {
        let dir = std::env::temp_dir().join(format!("matformer-synth-g3n-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for dtype in [DType::F16, DType::Q4_0, DType::Q8_0] {
            let out = dir.join(format!("tiny-{}.matf", dtype.name()));
            let o = opts("gemma-3n-tiny", None, dtype);
            let len = synth(&o, &out).unwrap();
            assert_eq!(len, planned_len(&o).unwrap());
            let f = matformer::ModelFile::open(&out).unwrap();
            f.verify().unwrap();
            let meta = f.metadata();
            let g = Gemma3nConfig::from_metadata(meta).unwrap().unwrap();
            assert_eq!(g.sliding.iter().enumerate().filter(|(_, s)| !**s).map(|(i, _)| i).collect::<Vec<_>>(), [4, 9]);
            assert_eq!((g.kv_shared_layers, g.laurel_rank, g.sliding_window), (4, 8, 4));
            assert_eq!(g.activation_sparsity[..4], [0.95, 0.95, 0.95, 0.0]);
            assert_eq!(meta.ffn_widths, vec![vec![64, 128]; 10]);
            let view = f.view();
            assert!(view.tensor("layers.5.wk").is_ok() && view.tensor("layers.5.k_norm").is_ok());
            assert!(view.tensor("layers.6.wk").is_err(), "KV-shared layers have no wk");
            let router = view.tensor("layers.0.altup.router").unwrap();
            let wanted = if dtype == DType::Q8_0 || dtype == DType::Q4_0 { DType::F16 } else { dtype };
            assert_eq!(router.dtype, wanted);
            assert_eq!(view.tensor("layers.0.ffn_up").unwrap().dtype, dtype);
            for t in ["norm", "layers.3.altup.correct_output_scale", "per_layer_embeddings", "layers.2.ffn_down_t"] {
                let v = f.tensor_f32(t).unwrap();
                assert!(v.iter().all(|x| x.is_finite() && x.abs() <= 1.0), "{t}");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn gemma3n_e4b_narrow_offers_google_slices() {
        let o = opts("gemma-3n-e4b-narrow", None, DType::F16);
        let meta = synth_metadata(&o).unwrap();
        assert!(matformer::elastic::gemma3n_slices::is_e4b_shaped(&meta));
        let g = Gemma3nConfig::from_metadata(&meta).unwrap().unwrap();
        assert_eq!(g.kv_producers(), vec![18, 19]);
        assert_eq!(meta.architecture.d_model, 8);
        let len = planned_len(&o).unwrap();
        assert!((20_000_000..40_000_000).contains(&len), "{len}");
    }
}
