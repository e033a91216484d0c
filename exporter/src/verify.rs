//! Proof that a `.matf` reproduces its source ONNX: tract-onnx runs the source graph (with the
//! FFN weights sliced to each submodel's widths) and the runtime's CPU engine runs the written
//! file on the same probe tokens; logits must agree within a named tolerance chosen by dtype.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use matformer::cpu::CpuEngine;
use matformer::format::{DType, Metadata};
use matformer::{ModelFile, Submodel};
use serde::Serialize;
use tract_onnx::pb;
use tract_onnx::prelude::*;

use crate::mapping::WeightMap;
use crate::onnx_source::{constant_value_mut, SourceModel, WeightRef};
use crate::tract_run;

/// Agreement bound on logits, relative to the reference's scale:
/// `max |engine - onnx| <= bound * max(1, max |onnx|)` over every position and vocabulary entry.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Tolerance {
    /// Tier name.
    pub name: &'static str,
    /// Bound relative to the logit scale.
    pub bound: f32,
}

impl Tolerance {
    /// f32 storage: the file holds the source's exact values; only summation order differs
    /// between tract and the engine (f32 unit roundoff 6e-8, accumulated over a few thousand
    /// terms per logit and a few layers stays far below 1e-4).
    pub const F32_STORAGE: Tolerance = Tolerance { name: "f32_storage", bound: 1e-4 };
    /// f16 storage: every weight is rounded to 11 significant bits (relative error up to
    /// 2^-11 = 4.9e-4 each). Independent rounding errors partly cancel in each dot product, but
    /// they pass through every layer and the LM head; 1e-2 of the logit scale is 20x the unit
    /// roundoff and still an order of magnitude below any real modelling error (a wrong
    /// weight, transposition or width changes logits by O(1) of their scale).
    pub const F16_STORAGE: Tolerance = Tolerance { name: "f16_storage", bound: 1e-2 };

    /// 8-bit blocks (`q8_0`): each weight moves by up to half a step of 1/127 of its block's
    /// maximum, and the engine rounds activations to 8 bits per block as well (about 100x the
    /// f16 rounding). A tenth of the logit scale still separates rounding from a wrong tensor.
    pub const Q8_STORAGE: Tolerance = Tolerance { name: "q8_storage", bound: 1e-1 };
    /// 4-bit blocks (`q4_0`, `q4_1`): 16 levels per block, errors of several percent per weight;
    /// only gross mistakes (a wrong or transposed tensor) exceed half the logit scale.
    pub const Q4_STORAGE: Tolerance = Tolerance { name: "q4_storage", bound: 5e-1 };

    /// The tier for a storage dtype.
    pub fn for_dtype(dtype: DType) -> Tolerance {
        match dtype {
            DType::F32 => Self::F32_STORAGE,
            DType::F16 => Self::F16_STORAGE,
            DType::Q8_0 => Self::Q8_STORAGE,
            DType::Q4_0 | DType::Q4_1 => Self::Q4_STORAGE,
        }
    }

    /// The tier of a file: that of its coarsest tensor dtype (fewest bits per weight).
    pub fn for_model(model: &ModelFile) -> Tolerance {
        let coarsest = model
            .view()
            .tensors
            .iter()
            .map(|t| t.dtype)
            .min_by(|a, b| a.bits_per_weight().total_cmp(&b.bits_per_weight()))
            .unwrap_or(DType::F32);
        Self::for_dtype(coarsest)
    }
}

/// What to check.
#[derive(Clone, Debug)]
pub struct VerifyOptions {
    /// Submodels to compare; empty means every uniform level plus one growing Mix'n'Match.
    pub submodels: Vec<String>,
    /// Probe length in tokens (including BOS).
    pub probe_len: usize,
    /// Tolerance override (default: by dtype).
    pub tolerance: Option<Tolerance>,
    /// Verify against these PyTorch goldens instead of running the ONNX graph in tract.
    pub goldens: Option<std::path::PathBuf>,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions { submodels: vec![], probe_len: 24, tolerance: None, goldens: None }
    }
}

/// One submodel x probe comparison.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// Submodel name.
    pub submodel: String,
    /// FFN neurons per layer.
    pub widths: Vec<u32>,
    /// Probe index.
    pub probe: usize,
    /// Largest |engine - onnx| over all logits.
    pub max_abs_diff: f32,
    /// Largest |onnx| logit.
    pub max_abs_ref: f32,
    /// max_abs_diff / max(1, max_abs_ref).
    pub relative: f32,
    /// Positions whose argmax agrees, of `positions`.
    pub argmax_agree: usize,
    /// Positions compared.
    pub positions: usize,
    /// Within tolerance.
    pub passed: bool,
}

/// All comparisons.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    /// What the file was compared with: `tract-onnx`, or `goldens FILE`.
    pub reference: String,
    /// Tolerance applied.
    pub tolerance: Tolerance,
    /// Every check.
    pub checks: Vec<Check>,
    /// All passed.
    pub passed: bool,
}

impl VerifyReport {
    /// One line: worst relative difference and failures.
    pub fn summary(&self) -> String {
        let worst = self.checks.iter().map(|c| c.relative).fold(0f32, f32::max);
        let failed: Vec<String> = self
            .checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| format!("{} (probe {}): {:.2e}", c.submodel, c.probe, c.relative))
            .collect();
        if failed.is_empty() {
            format!(
                "{} checks passed; worst relative logit difference {worst:.2e} <= {:.0e} ({})",
                self.checks.len(),
                self.tolerance.bound,
                self.tolerance.name
            )
        } else {
            format!(
                "{} of {} checks exceed {:.0e} ({}): {}",
                failed.len(),
                self.checks.len(),
                self.tolerance.bound,
                self.tolerance.name,
                failed.join(", ")
            )
        }
    }
}

/// Deterministic probe token sequences: BOS + English text, and BOS + pseudo-random bytes.
pub fn probes(meta: &Metadata, len: usize) -> Vec<Vec<u32>> {
    let bos = meta.tokenizer.bos_id;
    let text = b"The meaning of a word is found in its use; the quick brown fox jumps over the lazy dog.";
    let mut a: Vec<u32> = bos.into_iter().collect();
    a.extend(text.iter().map(|&b| b as u32));
    a.truncate(len);
    let mut b: Vec<u32> = bos.into_iter().collect();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    while b.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        b.push((state % 256) as u32);
    }
    vec![a, b]
}

/// Default submodels: each uniform level, plus a non-decreasing Mix'n'Match across the layers.
pub fn default_submodels(meta: &Metadata) -> Vec<Submodel> {
    let n_layers = meta.architecture.n_layers as usize;
    let n_levels = meta.n_levels();
    let mut v: Vec<Submodel> = (0..n_levels).map(|l| Submodel::uniform(l as u8, n_layers)).collect();
    if n_levels > 1 && n_layers > 1 {
        let levels = (0..n_layers).map(|i| ((i * n_levels) / n_layers) as u8).collect();
        v.push(Submodel::new(levels));
    }
    v
}

/// Copy of the source graph with each layer's FFN weights sliced to `widths[layer]` neurons.
pub fn sliced_proto(src: &SourceModel, map: &WeightMap, widths: &[u32]) -> Result<pb::ModelProto> {
    let mut proto = src.proto.clone();
    for (layer, &k) in widths.iter().enumerate() {
        for (name, neuron_axis_canonical) in [("ffn_gate", 0usize), ("ffn_up", 0), ("ffn_down", 1)] {
            let full = format!("layers.{layer}.{name}");
            let Some(loc) = map.entries.get(&full) else { continue };
            let w = src.weight(&loc.weight)?;
            // The neuron axis in the stored tensor.
            let axis = if loc.transposed { 1 - neuron_axis_canonical } else { neuron_axis_canonical };
            let (r, c) = (w.shape[0], w.shape[1]);
            let k = k as usize;
            let (nr, nc) = if axis == 0 { (k.min(r), c) } else { (r, k.min(c)) };
            let mut data = Vec::with_capacity(nr * nc);
            for i in 0..nr {
                data.extend_from_slice(&w.data[i * c..i * c + nc]);
            }
            let t = match &loc.weight {
                WeightRef::Initializer(i) => &mut proto.graph.as_mut().expect("graph").initializer[*i],
                WeightRef::ConstantNode(n) => constant_value_mut(&mut proto.graph.as_mut().expect("graph").node[*n])
                    .ok_or_else(|| anyhow!("constant node lost its value"))?,
            };
            let raw: Vec<u8> = match t.data_type {
                1 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                10 => data.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
                other => bail!("FFN weight `{full}` has ONNX data type {other}; only float and float16 are supported"),
            };
            t.dims = vec![nr as i64, nc as i64];
            t.raw_data = raw;
            t.float_data.clear();
            t.int32_data.clear();
        }
    }
    Ok(proto)
}

/// Runs the source ONNX (sliced to `widths`) with tract on each probe; returns logits
/// `[len * vocab]` per probe. One plan per probe length (input facts are concrete).
pub fn run_onnx(
    src: &SourceModel,
    map: &WeightMap,
    widths: &[u32],
    probes: &[Vec<u32>],
    vocab: usize,
) -> Result<Vec<Vec<f32>>> {
    let proto = sliced_proto(src, map, widths)?;
    let mut out = Vec::new();
    let mut plans: Vec<(usize, Arc<TypedRunnableModel>)> = Vec::new();
    for p in probes {
        let len = p.len();
        if !plans.iter().any(|(l, _)| *l == len) {
            plans.push((len, tract_run::runnable(&proto, len)?));
        }
        let plan = &plans.iter().find(|(l, _)| *l == len).expect("planned above").1;
        let v = tract_run::run(plan, &proto, p)?;
        if v.len() != len * vocab {
            bail!("the ONNX graph returned {} logits for {len} tokens, expected {len} x {vocab}", v.len());
        }
        out.push(v);
    }
    Ok(out)
}

/// Runs the CPU engine on the written file for each probe.
pub fn run_engine(model: &Arc<ModelFile>, submodel: &Submodel, probes: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
    let engine = CpuEngine::new(model.clone())?;
    probes
        .iter()
        .map(|p| {
            let mut s = engine.session(submodel)?;
            Ok(s.forward_all(p)?)
        })
        .collect()
}

/// Compares two logit arrays `[positions * vocab]`.
pub fn compare(reference: &[f32], actual: &[f32], vocab: usize, tol: Tolerance) -> (f32, f32, usize, usize, bool) {
    let mut max_diff = 0f32;
    let mut max_ref = 0f32;
    let mut finite = true;
    for (r, a) in reference.iter().zip(actual) {
        if !a.is_finite() || !r.is_finite() {
            finite = false;
        }
        max_diff = max_diff.max((r - a).abs());
        max_ref = max_ref.max(r.abs());
    }
    let positions = reference.len() / vocab.max(1);
    let agree = (0..positions)
        .filter(|&p| argmax(&reference[p * vocab..(p + 1) * vocab]) == argmax(&actual[p * vocab..(p + 1) * vocab]))
        .count();
    let relative = max_diff / max_ref.max(1.0);
    (max_diff, max_ref, agree, positions, finite && relative <= tol.bound)
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

/// Verifies the file at `matf` against the source.
pub fn verify_against_onnx(
    src: &SourceModel,
    map: &WeightMap,
    matf: &Path,
    opts: &VerifyOptions,
) -> Result<VerifyReport> {
    let model = Arc::new(ModelFile::open(matf)?);
    let meta = model.metadata().clone();
    let tolerance = opts.tolerance.unwrap_or(Tolerance::for_model(&model));
    let submodels: Vec<Submodel> = if opts.submodels.is_empty() {
        default_submodels(&meta)
    } else {
        opts.submodels
            .iter()
            .map(|s| Submodel::parse(s, &meta, model.view().available_levels))
            .collect::<Result<_, _>>()?
    };
    // A graph exported with a static sequence axis runs at that length only.
    let probe_len = match tract_run::fixed_sequence_len(&src.proto)? {
        Some(fixed) => {
            eprintln!("the ONNX graph's sequence axis is static ({fixed} tokens): probes are {fixed} tokens long");
            fixed
        }
        None => opts.probe_len,
    };
    let probes = probes(&meta, probe_len.min(meta.architecture.max_context as usize));
    let vocab = meta.architecture.vocab_size as usize;
    let mut checks = Vec::new();
    for (k, sub) in submodels.iter().enumerate() {
        let widths = sub.widths(&meta);
        let name = sub.name(&meta);
        eprintln!("verifying {name} ({}/{}) against tract-onnx", k + 1, submodels.len());
        let reference = run_onnx(src, map, &widths, &probes, vocab)?;
        let actual = run_engine(&model, sub, &probes)?;
        for (i, (r, a)) in reference.iter().zip(&actual).enumerate() {
            let (max_abs_diff, max_abs_ref, argmax_agree, positions, passed) = compare(r, a, vocab, tolerance);
            checks.push(Check {
                submodel: name.clone(),
                widths: widths.clone(),
                probe: i,
                max_abs_diff,
                max_abs_ref,
                relative: max_abs_diff / max_abs_ref.max(1.0),
                argmax_agree,
                positions,
                passed,
            });
        }
    }
    let passed = checks.iter().all(|c| c.passed);
    Ok(VerifyReport { reference: "tract-onnx".into(), tolerance, checks, passed })
}

/// Reference logits made by the model's own framework (PyTorch), for models whose ONNX graph
/// tract cannot run: `matformer export --verify-goldens FILE` (format in docs/exporter.md).
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Goldens {
    /// Where the logits come from, informational.
    #[serde(default)]
    pub source: String,
    /// One entry per prompt.
    pub probes: Vec<GoldenProbe>,
}

/// One prompt of a [`Goldens`] file.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct GoldenProbe {
    /// Token ids fed to the model.
    pub ids: Vec<u32>,
    /// `logits[position][token]` of the full-width model, float32.
    pub logits: Vec<Vec<f32>>,
}

impl Goldens {
    /// Reads a goldens JSON file and checks it against the model's vocabulary and context.
    pub fn load(path: &Path, meta: &Metadata) -> Result<Goldens> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading goldens {}", path.display()))?;
        let g: Goldens = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a goldens file (probes: [{{ids, logits}}])", path.display()))?;
        let vocab = meta.architecture.vocab_size as usize;
        if g.probes.is_empty() {
            bail!("goldens {} hold no probes", path.display());
        }
        for (i, p) in g.probes.iter().enumerate() {
            if p.ids.is_empty() || p.ids.len() > meta.architecture.max_context as usize {
                bail!("goldens probe {i} has {} tokens; expected 1 to {}", p.ids.len(), meta.architecture.max_context);
            }
            if let Some(bad) = p.ids.iter().find(|&&t| t as usize >= vocab) {
                bail!("goldens probe {i} has token {bad}, outside the vocabulary ({vocab})");
            }
            if p.logits.len() != p.ids.len() || p.logits.iter().any(|row| row.len() != vocab) {
                bail!("goldens probe {i}: logits must be {} positions x {vocab} tokens", p.ids.len());
            }
        }
        Ok(g)
    }
}

/// Verifies the file at `matf` against PyTorch goldens: the full-width model (every layer at
/// its widest level) must reproduce each probe's logits within the dtype's tolerance.
pub fn verify_against_goldens(matf: &Path, goldens: &Path, opts: &VerifyOptions) -> Result<VerifyReport> {
    let model = Arc::new(ModelFile::open(matf)?);
    let meta = model.metadata().clone();
    let g = Goldens::load(goldens, &meta)?;
    let tolerance = opts.tolerance.unwrap_or(Tolerance::for_model(&model));
    let full = Submodel::uniform((meta.n_levels() - 1) as u8, meta.architecture.n_layers as usize);
    let widths = full.widths(&meta);
    let name = full.name(&meta);
    let vocab = meta.architecture.vocab_size as usize;
    eprintln!("verifying {name} against {} goldens of {}", g.probes.len(), goldens.display());
    let ids: Vec<Vec<u32>> = g.probes.iter().map(|p| p.ids.clone()).collect();
    let actual = run_engine(&model, &full, &ids)?;
    let mut checks = Vec::new();
    for (i, (p, a)) in g.probes.iter().zip(&actual).enumerate() {
        let reference: Vec<f32> = p.logits.iter().flatten().copied().collect();
        let (max_abs_diff, max_abs_ref, argmax_agree, positions, passed) = compare(&reference, a, vocab, tolerance);
        checks.push(Check {
            submodel: name.clone(),
            widths: widths.clone(),
            probe: i,
            max_abs_diff,
            max_abs_ref,
            relative: max_abs_diff / max_abs_ref.max(1.0),
            argmax_agree,
            positions,
            passed,
        });
    }
    let passed = checks.iter().all(|c| c.passed);
    Ok(VerifyReport { reference: format!("goldens {}", goldens.display()), tolerance, checks, passed })
}
