//! `matformer synth`: files in the real format with random weights at real model shapes, for
//! benchmarks at realistic size (no trained model of that size is needed).

use std::io::BufWriter;
use std::path::Path;

use anyhow::{bail, Context, Result};
use matformer::format::{
    self, Activation, Architecture, Metadata, NestingOrigin, NormKind, Positional, Provenance, Tokenizer,
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
    /// Full FFN width (nested widths are h/8, h/4, h/2, h).
    pub ffn_width: u32,
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
        },
        SynthPreset {
            name: "gemma-3n-e2b",
            description: "Gemma-3n-E2B-like shapes without Gemma's extras: d_model 2048, 30 layers, 8 heads / 2 KV heads of 256, FFN 8192, GeGLU, 262144 vocab (2.0B params)",
            architecture: arch("gemma3n-like", 2048, 30, 8, 2, 256, 262_144, Activation::GeluTanh, 1_000_000.0),
            ffn_width: 8192,
        },
        SynthPreset {
            name: "small",
            description: "A small model for quick runs: d_model 512, 8 layers, 8 heads / 4 KV heads, FFN 2048, 32000 vocab (~42M params)",
            architecture: arch("llama", 512, 8, 8, 4, 64, 32_000, Activation::Silu, 10_000.0),
            ffn_width: 2048,
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
        a.n_layers = l;
    }
    let h = p.ffn_width;
    let widths = vec![h / 8, h / 4, h / 2, h];
    let mut meta = Metadata {
        ffn_widths: vec![widths; a.n_layers as usize],
        level_names: default_level_names(4),
        tokenizer: Tokenizer { kind: "bytes".into(), bos_id: Some(256), eos_id: Some(257) },
        provenance: Provenance {
            source_sha256: "synthetic".into(),
            source_name: format!("synth:{} seed {}", p.name, opts.seed),
            exporter: format!("matformer-export {}", env!("CARGO_PKG_VERSION")),
        },
        architecture: a,
        extra: Default::default(),
    };
    // Synthetic files stand in for MatFormer-trained models (benchmarks of their shapes).
    meta.set_nesting(NestingOrigin::Trained);
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

/// Writes a synthetic file; returns its length.
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
