//! ONNX -> `.matf`: gather the weights in canonical layout, convert the dtype, write the file
//! with its level-ordered layout, then verify it against tract-onnx before keeping it.

use std::collections::HashMap;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use matformer::format::{self, names, testing::required_tensor_specs, DType, FormatError, Metadata};

use crate::dtype_plan::DTypePlan;

use crate::mapping::{find_weights, Strategy, WeightMap};
use crate::onnx_source::{SourceModel, Weight};
use crate::progress::Progress;
use crate::verify::{verify_against_goldens, verify_against_onnx, VerifyOptions, VerifyReport};

/// Options of `matformer export`.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// Source `.onnx`.
    pub input: PathBuf,
    /// Destination `.matf`.
    pub output: PathBuf,
    /// Storage dtype of each tensor (`--dtype`, `--dtype-override`).
    pub dtype: DTypePlan,
    /// Uniform nested widths overriding the model's metadata.
    pub widths: Option<Vec<u32>>,
    /// Sidecar config JSON when the ONNX carries none.
    pub config: Option<PathBuf>,
    /// How to find the weights.
    pub strategy: Strategy,
    /// Verification settings; `None` skips verification (not recommended).
    pub verify: Option<VerifyOptions>,
    /// Calibration text: when given, the Mix'n'Match catalog's losses are estimated on it with
    /// the CPU engine and the catalog is stored in the file's metadata (`catalog`).
    pub calibration: Option<PathBuf>,
}

/// What an export produced.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ExportReport {
    /// Written file.
    pub output: String,
    /// File length in bytes.
    pub bytes: u64,
    /// Byte offset where each level ends (cut points).
    pub level_ends: Vec<u64>,
    /// How the weights were found.
    pub weights_found_by: String,
    /// Verification results (one per submodel checked).
    pub verification: Option<VerifyReport>,
    /// Calibration of the stored catalog, when `--calibration` was given.
    pub calibration: Option<matformer::elastic::CalibrationSummary>,
    /// Entries on the stored Pareto frontier (bytes vs loss), smallest first.
    pub frontier: Vec<String>,
}

/// Source canonical name of a file tensor and whether the source is `[d_model, width]`
/// (the down projection, which the file stores transposed).
fn source_of(file_name: &str) -> (String, bool) {
    match file_name.strip_suffix(names::FFN_DOWN_T) {
        Some(prefix) => (format!("{prefix}ffn_down"), true),
        None => (file_name.to_string(), false),
    }
}

/// A weight in PyTorch layout (`[out, in]`), or its transpose when `want_transposed`.
fn canonical(w: &Weight, stored_transposed: bool, want_transposed: bool) -> Result<Weight> {
    if w.shape.len() == 1 {
        return Ok(w.clone());
    }
    if w.shape.len() != 2 {
        bail!("expected a matrix, found shape {:?}", w.shape);
    }
    if stored_transposed == want_transposed {
        return Ok(w.clone());
    }
    let (r, c) = (w.shape[0], w.shape[1]);
    let mut data = vec![0f32; r * c];
    for i in 0..r {
        for j in 0..c {
            data[j * r + i] = w.data[i * c + j];
        }
    }
    Ok(Weight { shape: vec![c, r], data })
}

/// Loads every file tensor (canonical file layout, f32) from the source.
pub fn gather_tensors(src: &SourceModel, map: &WeightMap, meta: &Metadata) -> Result<HashMap<String, Weight>> {
    let mut out = HashMap::new();
    for spec in required_tensor_specs(meta, DType::F32) {
        let (source_name, is_down) = source_of(&spec.name);
        let loc = map.get(&source_name)?;
        let raw = src.weight(&loc.weight)?;
        // Down: source [d_model, width] in PyTorch layout; the file wants [width, d_model].
        let w = canonical(&raw, loc.transposed, is_down)?;
        let want: Vec<usize> = spec.shape.iter().map(|&d| d as usize).collect();
        if w.shape != want {
            bail!(
                "tensor `{}` from `{}` has shape {:?} in the file's layout, expected {:?}",
                spec.name,
                src.weight_name(&loc.weight),
                w.shape,
                want
            );
        }
        out.insert(spec.name.clone(), w);
    }
    Ok(out)
}

/// Appends `rows` of `w` (row-major f32) to `out` in `dtype` (block-quantised types encode each
/// row on its own, so a prefix of rows is a prefix of bytes).
pub fn encode_rows(
    w: &[f32],
    row_elems: usize,
    rows: std::ops::Range<u64>,
    dtype: DType,
    out: &mut Vec<u8>,
) -> Result<(), FormatError> {
    let start = rows.start as usize * row_elems;
    let end = rows.end as usize * row_elems;
    let src =
        w.get(start..end).ok_or_else(|| FormatError::BadMetadata { reason: format!("rows {rows:?} out of range") })?;
    for row in src.chunks(row_elems.max(1)) {
        matformer::quant::encode_row(dtype, row, out)?;
    }
    Ok(())
}

/// Writes `tensors` to `path` with the given metadata.
pub fn write_matf(path: &Path, meta: &Metadata, tensors: &HashMap<String, Weight>, dtype: &DTypePlan) -> Result<u64> {
    write_matf_with_blobs(path, meta, tensors, dtype, &[])
}

/// [`write_matf`] with blobs (docs/format.md 5.5), such as a stored tokenizer
/// (`matformer::tokenizer::TokenizerAssets::blobs`).
pub fn write_matf_with_blobs(
    path: &Path,
    meta: &Metadata,
    tensors: &HashMap<String, Weight>,
    dtype: &DTypePlan,
    blobs: &[format::BlobSpec<'_>],
) -> Result<u64> {
    write_matf_keeping_blocks(path, meta, tensors, &Default::default(), dtype, blobs)
}

/// [`write_matf_with_blobs`] that copies a tensor's rows from `raw` (source blocks in canonical
/// row order, e.g. a GGUF's `Q4_0` blocks) when the planned dtype is their block type.
pub fn write_matf_keeping_blocks(
    path: &Path,
    meta: &Metadata,
    tensors: &HashMap<String, Weight>,
    raw: &crate::gguf::llama::RawBlocks,
    dtype: &DTypePlan,
    blobs: &[format::BlobSpec<'_>],
) -> Result<u64> {
    let specs = dtype.specs(meta)?;
    let file = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut progress = Progress::new("writing");
    let len = format::write_file_with_blobs(
        BufWriter::new(file),
        meta,
        &specs,
        blobs,
        format::DEFAULT_ALIGNMENT_LOG2,
        |idx, rows, out| {
            let spec = &specs[idx];
            let row_elems: u64 = spec.shape.iter().skip(1).product();
            if let Some((_, bytes)) = raw.get(&spec.name).filter(|(d, _)| *d == spec.dtype) {
                let rb = spec.dtype.row_bytes(row_elems).unwrap_or(0) as usize;
                let piece = bytes.get(rows.start as usize * rb..rows.end as usize * rb).ok_or_else(|| {
                    FormatError::BadMetadata { reason: format!("{}: source blocks too short", spec.name) }
                })?;
                out.extend_from_slice(piece);
                return Ok(());
            }
            let w = tensors.get(&spec.name).ok_or_else(|| FormatError::MissingTensor { name: spec.name.clone() })?;
            encode_rows(&w.data, row_elems as usize, rows, spec.dtype, out)
        },
        |done, total| progress.update(done, total),
    )
    .map_err(|e| anyhow!("{e}"))?;
    progress.finish();
    Ok(len)
}

/// Runs an export: read, map, convert, write to a temporary name, verify, then rename.
/// On any failure no output file is left behind.
pub fn export(opts: &ExportOptions) -> Result<ExportReport> {
    eprintln!("reading {}", opts.input.display());
    let src = SourceModel::load(&opts.input)?;
    let config = src.config(opts.config.as_deref())?;
    let meta = src.metadata(&config, opts.widths.as_deref())?;
    let map = find_weights(&src, &meta.architecture, &opts.strategy)?;
    eprintln!("found {} weights by {}", map.entries.len(), map.method);
    let tensors = gather_tensors(&src, &map, &meta)?;

    let tmp = opts.output.with_extension("matf.partial");
    let result = (|| -> Result<ExportReport> {
        let bytes = write_matf(&tmp, &meta, &tensors, &opts.dtype)?;
        let verification = match &opts.verify {
            Some(v) => {
                let report = match &v.goldens {
                    Some(goldens) => verify_against_goldens(&tmp, goldens, v)?,
                    None => verify_against_onnx(&src, &map, &tmp, v)?,
                };
                if !report.passed {
                    bail!("verification failed: {}", report.summary());
                }
                Some(report)
            }
            None => None,
        };
        let (calibration, frontier) = match &opts.calibration {
            Some(text_path) => {
                let (meta2, summary, frontier) = calibrate_catalog(&tmp, &meta, text_path)?;
                write_matf(&tmp, &meta2, &tensors, &opts.dtype)?;
                matformer::ModelFile::open(&tmp)?.verify()?;
                (Some(summary), frontier)
            }
            None => (None, Vec::new()),
        };
        std::fs::rename(&tmp, &opts.output)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), opts.output.display()))?;
        let view = matformer::ModelFile::open(&opts.output)?;
        Ok(ExportReport {
            output: opts.output.display().to_string(),
            bytes,
            level_ends: view.view().level_ends.clone(),
            weights_found_by: map.method.clone(),
            verification,
            calibration,
            frontier,
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Estimates the catalog's losses on `text_path` with the CPU engine on the written file and
/// returns the metadata with the catalog stored under `catalog`.
fn calibrate_catalog(
    written: &Path,
    meta: &Metadata,
    text_path: &Path,
) -> Result<(Metadata, matformer::elastic::CalibrationSummary, Vec<String>)> {
    use crate::calibrate::{calibrate, CalibrationOptions};
    use matformer::elastic::{Catalog, CATALOG_KEY};
    let text =
        std::fs::read(text_path).with_context(|| format!("cannot read calibration text {}", text_path.display()))?;
    let model = std::sync::Arc::new(matformer::ModelFile::open(written)?);
    let engine = matformer::cpu::CpuEngine::new(model.clone())?;
    let catalog = Catalog::from_model(&model);
    eprintln!(
        "calibrating {} catalog entries on {} bytes of {}",
        catalog.entries.len(),
        text.len(),
        text_path.display()
    );
    let report = calibrate(&engine, &catalog, &text, &CalibrationOptions::default(), |msg| eprintln!("  {msg}"))
        .map_err(|e| anyhow!("calibration failed: {e}"))?;
    let mut meta2 = meta.clone();
    meta2.extra.insert(CATALOG_KEY.to_string(), report.catalog.to_json());
    Ok((meta2, report.summary, report.frontier))
}
