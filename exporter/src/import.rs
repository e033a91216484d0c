//! `matformer import`: a GGUF file or a Hugging Face model directory (Llama family, or Gemma 3n
//! through [`crate::gemma3n_import`]) -> `.matf`.
//!
//! The source is read into canonical tensors (f32, the file's layouts); the tokenizer, its
//! special tokens and the chat template are stored as every Hugging Face tokenizer is
//! ([`TokenizerAssets`]: blob `blob.tokenizer_json`, metadata `special_tokens` and
//! `chat_template`, docs/format.md 5.5 and 6). The file is written under a temporary name,
//! re-opened, checksum-verified and its tokenizer loaded back, then renamed: a failed import
//! leaves no output file behind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use matformer::format::{self, Architecture, DType, FormatError, Metadata, Provenance, Tokenizer};
use matformer::tokenizer::TokenizerAssets;
use sha2::{Digest, Sha256};

use crate::dtype_plan::DTypePlan;
use crate::export::write_matf_with_blobs;
use crate::gguf::llama::RawBlocks;
use crate::gguf::{self, Gguf, ImportedTokenizer};
use crate::hf_import;
use crate::nest::{self, NestOptions, NestReport};
use crate::onnx_source::Weight;
use crate::progress::Progress;

/// Options of `matformer import`.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// A `.gguf` file or a Hugging Face model directory.
    pub input: PathBuf,
    /// Destination `.matf`.
    pub output: PathBuf,
    /// Storage dtype of each tensor (`--dtype`, `--dtype-override`).
    pub dtype: DTypePlan,
    /// Order the FFN neurons by importance and declare nested levels (`--nest`).
    pub nest: Option<NestOptions>,
}

/// A model read from its source, in canonical layout.
#[derive(Debug)]
pub struct SourceWeights {
    /// Metadata of a one-level (dense) file.
    pub meta: Metadata,
    /// Canonical tensors (f32, file layout).
    pub tensors: HashMap<String, Weight>,
    /// Tokenizer, special tokens and chat template.
    pub tokenizer: ImportedTokenizer,
    /// `gguf` or `huggingface`.
    pub source_format: String,
    /// ggml or safetensors element types of the source tensors, with counts.
    pub source_types: std::collections::BTreeMap<String, usize>,
    /// Source blocks that can be stored as they are (GGUF `Q8_0`, `Q4_0`, `Q4_1` tensors whose
    /// rows are whole blocks: every tensor but the down projection).
    pub raw: RawBlocks,
    /// The dtype each canonical tensor gets under `--dtype keep` ([`DTypePlan::for_source`]).
    pub source_dtypes: HashMap<String, DType>,
}

/// What an import produced.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ImportReport {
    /// Written file.
    pub output: String,
    /// File length in bytes.
    pub bytes: u64,
    /// `gguf` or `huggingface`.
    pub source_format: String,
    /// Source tensor element types and how many tensors had each.
    pub source_types: std::collections::BTreeMap<String, usize>,
    /// Model family, layers, width, vocabulary.
    pub family: String,
    /// Transformer blocks.
    pub n_layers: u32,
    /// Residual width.
    pub d_model: u32,
    /// Vocabulary size.
    pub vocab_size: u32,
    /// Level names, smallest first.
    pub level_names: Vec<String>,
    /// FFN width of layer 0 at each level.
    pub ffn_widths_layer0: Vec<u32>,
    /// Storage dtype (with the overrides).
    pub dtype: String,
    /// Tensors whose source blocks (GGUF `Q8_0`, `Q4_0`, `Q4_1`) were stored as they are, with
    /// no dequantise-requantise loss.
    pub kept_source_blocks: Vec<String>,
    /// Tokenizer kind recorded.
    pub tokenizer: String,
    /// Beginning-of-sequence id.
    pub bos_id: Option<u32>,
    /// End-of-sequence id.
    pub eos_id: Option<u32>,
    /// Further tokens that end a generation (end of turn).
    pub end_of_turn: Vec<String>,
    /// Whether plain text gets BOS prepended.
    pub add_bos: bool,
    /// Whether a chat template was found.
    pub has_chat_template: bool,
    /// Nesting results (`--nest`).
    pub nest: Option<NestReport>,
    /// What the import left out or ignored (a multimodal checkpoint's vision and audio
    /// towers), one sentence each; also printed on stderr.
    pub notes: Vec<String>,
    /// Wall time of the import, seconds.
    pub seconds: f64,
}

fn sha256_hex(bytes: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(bytes);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Metadata for a dense (one-level) model. Its tokenizer is set by
/// [`TokenizerAssets::apply_to`] before writing.
pub fn dense_metadata(
    architecture: Architecture,
    ffn_width: u32,
    source_sha256: String,
    source_name: String,
) -> Metadata {
    let n_layers = architecture.n_layers as usize;
    Metadata {
        architecture,
        ffn_widths: vec![vec![ffn_width]; n_layers],
        level_names: vec!["full".to_string()],
        tokenizer: Tokenizer { kind: "bytes".to_string(), bos_id: None, eos_id: None },
        provenance: Provenance {
            source_sha256,
            source_name,
            exporter: format!("matformer-export {} (import)", env!("CARGO_PKG_VERSION")),
        },
        extra: Default::default(),
    }
}

/// Writes an imported model: its tensors in `dtype` and its tokenizer (`meta` must have been
/// through [`TokenizerAssets::apply_to`] with the same `assets`).
pub fn write_model(
    path: &Path,
    meta: &Metadata,
    tensors: &HashMap<String, Weight>,
    dtype: &DTypePlan,
    assets: &TokenizerAssets,
) -> Result<u64> {
    write_matf_with_blobs(path, meta, tensors, dtype, &assets.blobs())
}

/// [`write_model`] that stores a tensor's source blocks byte for byte (`raw`) when its planned
/// dtype is their block type, instead of quantising the dequantised values again.
pub fn write_model_keeping_blocks(
    path: &Path,
    meta: &Metadata,
    tensors: &HashMap<String, Weight>,
    raw: &RawBlocks,
    dtype: &DTypePlan,
    assets: &TokenizerAssets,
) -> Result<u64> {
    crate::export::write_matf_keeping_blocks(path, meta, tensors, raw, dtype, &assets.blobs())
}

/// The tensors of a write with `plan` whose source blocks are kept as they are.
pub fn kept_blocks(meta: &Metadata, raw: &RawBlocks, plan: &DTypePlan) -> Result<Vec<String>> {
    let mut kept: Vec<String> = plan
        .specs(meta)?
        .into_iter()
        .filter(|s| raw.get(&s.name).is_some_and(|(d, _)| *d == s.dtype))
        .map(|s| s.name)
        .collect();
    kept.sort();
    Ok(kept)
}

/// What an importer's writer produced ([`write_verified`]).
#[derive(Debug)]
pub(crate) struct Written {
    /// Bytes written.
    pub bytes: u64,
    /// Tensors whose source blocks were stored as they are.
    pub kept_source_blocks: Vec<String>,
    /// Nesting results (`--nest`).
    pub nest: Option<NestReport>,
}

/// What the report says about the source ([`ImportReport`]'s fields of the same names).
#[derive(Debug)]
pub(crate) struct ReportSource {
    /// `gguf` or `huggingface`.
    pub source_format: String,
    /// Source tensor element types and how many tensors had each.
    pub source_types: std::collections::BTreeMap<String, usize>,
    /// What the import left out or ignored.
    pub notes: Vec<String>,
}

/// The tail every import shares: `write` writes the file to the temporary path it is given
/// (`output` with the extension `matf.partial`; it may change the metadata, which the report
/// then describes), which is re-opened, checksum-verified, its tokenizer loaded back, and
/// renamed to `opts.output`. On any failure the temporary file is removed and no output is
/// left. Returns the report and the stored tokenizer assets.
pub(crate) fn write_verified(
    opts: &ImportOptions,
    started: Instant,
    mut meta: Metadata,
    assets: TokenizerAssets,
    source: ReportSource,
    write: impl FnOnce(&Path, &mut Metadata, &TokenizerAssets) -> Result<Written>,
) -> Result<(ImportReport, TokenizerAssets)> {
    let tmp = opts.output.with_extension("matf.partial");
    let result = (|| -> Result<Written> {
        let written = write(&tmp, &mut meta, &assets)?;
        let file = matformer::ModelFile::open(&tmp)?;
        file.verify()?;
        matformer::tokenizer::Tokenizer::from_model(&file)
            .map_err(|e| anyhow!("the written tokenizer does not load back: {e}"))?;
        drop(file);
        std::fs::rename(&tmp, &opts.output)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), opts.output.display()))?;
        Ok(written)
    })();
    let Written { bytes, kept_source_blocks, nest } = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let a = &meta.architecture;
    let report = ImportReport {
        output: opts.output.display().to_string(),
        bytes,
        source_format: source.source_format,
        source_types: source.source_types,
        family: a.family.clone(),
        n_layers: a.n_layers,
        d_model: a.d_model,
        vocab_size: a.vocab_size,
        level_names: meta.level_names.clone(),
        ffn_widths_layer0: meta.ffn_widths.first().cloned().unwrap_or_default(),
        dtype: opts.dtype.describe(),
        kept_source_blocks,
        tokenizer: meta.tokenizer.kind.clone(),
        bos_id: meta.tokenizer.bos_id,
        eos_id: meta.tokenizer.eos_id,
        end_of_turn: assets.special.end_of_turn.clone(),
        add_bos: assets.special.add_bos,
        has_chat_template: assets.chat_template.is_some(),
        nest,
        notes: source.notes,
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok((report, assets))
}

/// Writes `specs` to `path` with the tokenizer assets as blobs, each tensor's rows from
/// `fill(spec, rows, out)` (appending the rows' bytes in the spec's dtype), with progress on
/// stderr: the writer step of the Gemma 3n importers ([`write_verified`] does the rest).
pub(crate) fn write_specs(
    path: &Path,
    meta: &Metadata,
    specs: &[matformer::format::TensorSpec],
    assets: &TokenizerAssets,
    mut fill: impl FnMut(&matformer::format::TensorSpec, std::ops::Range<u64>, &mut Vec<u8>) -> Result<(), FormatError>,
) -> Result<u64> {
    let file = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut progress = Progress::new("writing");
    let bytes = format::write_file_with_blobs(
        std::io::BufWriter::with_capacity(1 << 20, file),
        meta,
        specs,
        &assets.blobs(),
        format::DEFAULT_ALIGNMENT_LOG2,
        |idx, rows, out| fill(&specs[idx], rows, out),
        |done, total| progress.update(done, total),
    )
    .map_err(|e| anyhow!("{e}"))?;
    progress.finish();
    Ok(bytes)
}

/// Reads a GGUF file into canonical tensors.
pub fn load_gguf(path: &Path) -> Result<SourceWeights> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: the map is read-only and private to this call; the file is an input we do not
    // modify, and every access goes through the checked reader. A concurrent truncation by
    // another process is the documented hazard of file mappings, accepted for an offline tool.
    let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
    let g = Gguf::parse(&map).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let arch = gguf::llama::architecture(&g).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let tokenizer = gguf::tokenizer::from_gguf(&g).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    if tokenizer.vocab_len != arch.vocab_size as usize {
        bail!(
            "{}: the tokenizer has {} tokens but the model's vocabulary is {}",
            path.display(),
            tokenizer.vocab_len,
            arch.vocab_size
        );
    }
    let mut source_types = std::collections::BTreeMap::new();
    for t in &g.tensors {
        *source_types.entry(gguf::GgmlType::code_name(t.type_code).to_string()).or_insert(0) += 1;
    }
    let mut progress = Progress::new("dequantising");
    let (tensors, raw, ffn, source_dtypes) = gguf::llama::tensors(&g, &arch, |d, t| progress.update(d, t))
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    progress.finish();
    let name = path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let meta = dense_metadata(arch, ffn, sha256_hex(&map), name);
    Ok(SourceWeights { meta, tensors, tokenizer, source_format: "gguf".into(), source_types, raw, source_dtypes })
}

/// Imports `opts.input` into `opts.output`. Returns the report and the stored tokenizer assets.
pub fn import(opts: &ImportOptions) -> Result<(ImportReport, TokenizerAssets)> {
    let started = Instant::now();
    eprintln!("reading {}", opts.input.display());
    if opts.input.is_dir() {
        if let Some(config) = crate::gemma3n_import::dir_config_if_gemma3n(&opts.input) {
            return crate::gemma3n_import::import_dir(opts, &config, started);
        }
    } else if gguf::gemma3n::file_is_gemma3n(&opts.input) {
        return gguf::gemma3n::import_gguf(opts, started);
    }
    let src = if opts.input.is_dir() { hf_import::load_dir(&opts.input)? } else { load_gguf(&opts.input)? };
    let SourceWeights { mut meta, mut tensors, tokenizer, source_format, source_types, mut raw, source_dtypes } = src;
    // `--dtype keep`: the source's own dtype per tensor.
    let plan = opts.dtype.for_source(&source_dtypes);
    let assets = tokenizer.assets;
    let runtime_tokenizer =
        assets.apply_to(&mut meta).map_err(|e| anyhow!("the model's tokenizer cannot be stored: {e}"))?;
    meta.validate().map_err(|e| anyhow!("the imported model is not valid: {e}"))?;

    let source = ReportSource { source_format, source_types, notes: Vec::new() };
    write_verified(opts, started, meta, assets, source, |tmp, meta, assets| {
        let nest = match &opts.nest {
            Some(n) => {
                // Nesting reorders the FFN rows: their source blocks no longer apply.
                raw.retain(|name, _| !name.contains("ffn_"));
                let (meta2, report) = nest::nest(meta, &mut tensors, &runtime_tokenizer, assets, n, &plan, tmp)?;
                *meta = meta2;
                Some(report)
            }
            None => None,
        };
        let kept_source_blocks = kept_blocks(meta, &raw, &plan)?;
        let bytes = write_model_keeping_blocks(tmp, meta, &tensors, &raw, &plan, assets)?;
        Ok(Written { bytes, kept_source_blocks, nest })
    })
}
