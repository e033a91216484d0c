//! Loading a source ONNX model: the protobuf (with external data inlined), its weights as f32,
//! the MatFormer config from its metadata (or a sidecar JSON), and a content hash.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use matformer::format::{Architecture, Metadata, NestingOrigin, Provenance, Tokenizer};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tract_onnx::pb::{self, tensor_proto::DataLocation};
use tract_onnx::prelude::*;

use crate::hf_config::{is_hf_config, HfConfig};

/// Metadata key (ONNX `metadata_props`) holding the MatFormer config JSON.
pub const CONFIG_KEY: &str = "matformer_config";

/// A constant weight found in the graph: an initializer or the value of a `Constant` node.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum WeightRef {
    /// `graph.initializer[index]`.
    Initializer(usize),
    /// The `value` attribute of `graph.node[index]` (op `Constant`).
    ConstantNode(usize),
}

/// A weight as f32 with its ONNX shape.
#[derive(Clone, Debug)]
pub struct Weight {
    /// Shape as stored in the ONNX file.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

/// The MatFormer config carried by an ONNX file (same keys as the `.matf` metadata, minus
/// provenance).
#[derive(Clone, Debug, Deserialize)]
pub struct SourceConfig {
    /// Architecture fields, flattened.
    #[serde(flatten)]
    pub architecture: Architecture,
    /// Per-layer nested widths; optional (then `--widths` must be given).
    #[serde(default)]
    pub ffn_widths: Option<Vec<Vec<u32>>>,
    /// Level names, smallest first.
    #[serde(default)]
    pub level_names: Option<Vec<String>>,
    /// Tokenizer.
    pub tokenizer: Tokenizer,
}

/// A loaded ONNX model.
#[derive(Debug)]
pub struct SourceModel {
    /// Path of the `.onnx` file.
    pub path: PathBuf,
    /// The protobuf, with every external tensor loaded into `raw_data` (self-contained).
    pub proto: pb::ModelProto,
    /// SHA-256 of the `.onnx` file followed by each external data file it references.
    pub sha256: String,
    /// Config from `metadata_props[matformer_config]`, if present.
    pub embedded_config: Option<SourceConfig>,
    /// Initializer name -> index in `graph.initializer`.
    pub initializer_index: HashMap<String, usize>,
}

impl SourceModel {
    /// Reads `path` (and any external data next to it).
    pub fn load(path: &Path) -> Result<SourceModel> {
        let onnx = tract_onnx::onnx();
        let mut proto = onnx
            .proto_model_for_path(path)
            .map_err(|e| anyhow!("{e:#}"))
            .with_context(|| format!("cannot read ONNX model {}", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let mut hasher = Sha256::new();
        hasher.update(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?);
        let graph = proto.graph.as_mut().ok_or_else(|| anyhow!("{}: the ONNX file has no graph", path.display()))?;

        // Inline external data so the proto is self-contained (tract can then run sliced
        // copies of it without a model directory).
        let mut hashed_files: Vec<String> = Vec::new();
        let dir_str = dir.to_str().ok_or_else(|| anyhow!("non UTF-8 model directory"))?.to_string();
        for init in graph.initializer.iter_mut() {
            if init.data_location == Some(DataLocation::External as i32) {
                let location = init
                    .external_data
                    .iter()
                    .find(|kv| kv.key == "location")
                    .map(|kv| kv.value.clone())
                    .ok_or_else(|| anyhow!("initializer `{}` is external but names no location", init.name))?;
                if !hashed_files.contains(&location) {
                    let data_path = dir.join(&location);
                    hasher.update(
                        std::fs::read(&data_path)
                            .with_context(|| format!("reading external data {}", data_path.display()))?,
                    );
                    hashed_files.push(location);
                }
                let tensor = tract_onnx::tensor::load_tensor(&*onnx.provider, init, Some(&dir_str))
                    .map_err(|e| anyhow!("{e:#}"))
                    .with_context(|| format!("loading external data of `{}`", init.name))?;
                init.raw_data = tensor_raw_bytes(&tensor)?;
                init.external_data.clear();
                init.data_location = Some(DataLocation::Default as i32);
            }
        }
        let initializer_index = graph.initializer.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        let embedded_config = match proto.metadata_props.iter().find(|kv| kv.key == CONFIG_KEY) {
            Some(kv) => Some(
                serde_json::from_str(&kv.value)
                    .with_context(|| format!("metadata_props[{CONFIG_KEY}] is not a valid config"))?,
            ),
            None => None,
        };
        let sha256 = hex(&hasher.finalize());
        Ok(SourceModel { path: path.to_path_buf(), proto, sha256, embedded_config, initializer_index })
    }

    /// The graph.
    pub fn graph(&self) -> &pb::GraphProto {
        self.proto.graph.as_ref().expect("checked at load")
    }

    /// The tensor proto behind a weight reference.
    pub fn weight_proto(&self, r: &WeightRef) -> Result<&pb::TensorProto> {
        let g = self.graph();
        match r {
            WeightRef::Initializer(i) => g.initializer.get(*i).ok_or_else(|| anyhow!("bad initializer index {i}")),
            WeightRef::ConstantNode(n) => constant_value(&g.node[*n])
                .ok_or_else(|| anyhow!("Constant node `{}` has no tensor value", g.node[*n].name)),
        }
    }

    /// Human name of a weight (initializer name or constant node output).
    pub fn weight_name(&self, r: &WeightRef) -> String {
        let g = self.graph();
        match r {
            WeightRef::Initializer(i) => g.initializer[*i].name.clone(),
            WeightRef::ConstantNode(n) => {
                g.node[*n].output.first().cloned().unwrap_or_else(|| format!("constant node {n}"))
            }
        }
    }

    /// Loads a weight as f32.
    pub fn weight(&self, r: &WeightRef) -> Result<Weight> {
        let proto = self.weight_proto(r)?;
        let tensor = tract_onnx::tensor::load_tensor(&*tract_onnx::onnx().provider, proto, None)
            .map_err(|e| anyhow!("{e:#}"))
            .with_context(|| format!("decoding weight `{}`", self.weight_name(r)))?;
        let shape = tensor.shape().to_vec();
        let f = tensor.cast_to::<f32>().map_err(|e| anyhow!("{e:#}"))?;
        let view = f.to_plain_array_view::<f32>().map_err(|e| anyhow!("{e:#}"))?;
        Ok(Weight { shape, data: view.iter().copied().collect() })
    }

    /// The config, from the first of: the file given by the user (`--config`), the ONNX's
    /// `matformer_config` metadata, a Hugging Face `config.json` next to the ONNX. A file may
    /// hold our own keys (docs/format.md) or a Hugging Face config.json, told apart by its keys.
    pub fn config(&self, sidecar: Option<&Path>) -> Result<SourceConfig> {
        if let Some(p) = sidecar {
            return read_config_file(p);
        }
        if let Some(c) = &self.embedded_config {
            return Ok(c.clone());
        }
        let next_to = self.path.with_file_name("config.json");
        if next_to.is_file() {
            eprintln!("using {} (no --config given, no `{CONFIG_KEY}` metadata)", next_to.display());
            return read_config_file(&next_to);
        }
        bail!(
            "{} carries no `{CONFIG_KEY}` metadata and has no config.json next to it; pass --config CONFIG.json \
             (a Hugging Face config.json, or our keys as in docs/format.md)",
            self.path.display()
        )
    }

    /// Builds the `.matf` metadata from the config and widths.
    pub fn metadata(&self, config: &SourceConfig, widths: Option<&[u32]>) -> Result<Metadata> {
        let n_layers = config.architecture.n_layers as usize;
        let ffn_widths = match (widths, &config.ffn_widths) {
            (Some(w), _) => vec![w.to_vec(); n_layers],
            (None, Some(w)) => w.clone(),
            (None, None) => bail!("the config names no nested FFN widths; pass --widths 64,128,256,512"),
        };
        let n_levels = ffn_widths.first().map(Vec::len).unwrap_or(0);
        let level_names = match &config.level_names {
            Some(n) if n.len() == n_levels => n.clone(),
            _ => default_level_names(n_levels),
        };
        // A config that declares several levels comes from MatFormer training; levels declared
        // only by --widths cut a model trained dense.
        let declared = config.ffn_widths.as_ref().and_then(|w| w.first()).map_or(0, Vec::len);
        let nesting = if declared > 1 {
            NestingOrigin::Trained
        } else if n_levels > 1 {
            NestingOrigin::PostHoc
        } else {
            NestingOrigin::Unknown
        };
        let mut meta = Metadata {
            architecture: config.architecture.clone(),
            ffn_widths,
            level_names,
            tokenizer: config.tokenizer.clone(),
            provenance: Provenance {
                source_sha256: self.sha256.clone(),
                source_name: self.path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
                exporter: format!("matformer-export {}", env!("CARGO_PKG_VERSION")),
            },
            extra: Default::default(),
        };
        meta.set_nesting(nesting);
        Ok(meta)
    }
}

/// Reads a config file holding either our own keys (docs/format.md) or a Hugging Face
/// `config.json` (recognised by its keys, see [`is_hf_config`]). A Hugging Face config gives a
/// one-level model (the full FFN; `--widths` declares nested levels) and a byte tokenizer with
/// the config's BOS and first EOS id: config.json does not describe the tokenizer itself.
pub fn read_config_file(path: &Path) -> Result<SourceConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("config {} is not JSON", path.display()))?;
    if is_hf_config(&value) {
        let hf = HfConfig::from_value(&value).with_context(|| format!("Hugging Face config {}", path.display()))?;
        eprintln!(
            "read Hugging Face config {} ({}, {} layers, d_model {}, FFN {})",
            path.display(),
            hf.architecture_name,
            hf.architecture.n_layers,
            hf.architecture.d_model,
            hf.intermediate_size
        );
        return Ok(hf.to_source_config(hf.tokenizer("bytes")));
    }
    serde_json::from_value(value).with_context(|| {
        format!(
            "{} is neither a MatFormer config (keys as in docs/format.md) nor a Hugging Face config.json",
            path.display()
        )
    })
}

/// Level names for `n` levels: `s, m, l, xl` for four, `l0, l1, ...` otherwise.
pub fn default_level_names(n: usize) -> Vec<String> {
    if n == 4 {
        ["s", "m", "l", "xl"].iter().map(|s| s.to_string()).collect()
    } else {
        (0..n).map(|i| format!("l{i}")).collect()
    }
}

/// The tensor value of a `Constant` node.
pub fn constant_value(node: &pb::NodeProto) -> Option<&pb::TensorProto> {
    if node.op_type != "Constant" {
        return None;
    }
    node.attribute.iter().find(|a| a.name == "value").and_then(|a| a.t.as_ref())
}

/// Mutable tensor value of a `Constant` node.
pub fn constant_value_mut(node: &mut pb::NodeProto) -> Option<&mut pb::TensorProto> {
    if node.op_type != "Constant" {
        return None;
    }
    node.attribute.iter_mut().find(|a| a.name == "value").and_then(|a| a.t.as_mut())
}

fn tensor_raw_bytes(t: &Tensor) -> Result<Vec<u8>> {
    Ok(t.as_bytes().to_vec())
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
