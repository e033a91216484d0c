//! Finding each weight of a MatFormer in an ONNX graph.
//!
//! Users' files come two ways:
//! - with the parameter names kept as initializer names (older `torch.onnx.export`, Hugging Face
//!   Optimum): a [`NamePreset`] (built in, or a mapping file) maps canonical names to them;
//! - with transposed Linear weights folded into anonymous constants (current `torch.onnx.export`):
//!   [`find_by_structure`] recognises the Llama-style block by its dataflow.
//!
//! Both produce a [`WeightMap`]: for every *source* canonical name (below) the constant that holds
//! it and whether it is stored transposed relative to PyTorch's `[out_features, in_features]`.
//!
//! Source canonical names: `tok_embeddings`, `norm`, `lm_head`, and per layer `layers.{i}.` +
//! `attn_norm`, `wq`, `wk`, `wv`, `wo`, `ffn_norm`, `ffn_gate`, `ffn_up`, `ffn_down`
//! (`ffn_down` is `[d_model, ffn_width]` here; the exporter stores it transposed as `ffn_down_t`).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use matformer::format::Architecture;
use serde::Deserialize;
use tract_onnx::pb;

use crate::onnx_source::{constant_value, SourceModel, WeightRef};

/// Where one canonical weight lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    /// The constant holding it.
    pub weight: WeightRef,
    /// The ONNX tensor is `[in, out]` (must be transposed to PyTorch's `[out, in]`).
    pub transposed: bool,
}

/// Canonical source name -> location.
#[derive(Clone, Debug)]
pub struct WeightMap {
    /// Entries.
    pub entries: BTreeMap<String, Located>,
    /// How the map was found (`"names: matlm"`, `"graph structure"`).
    pub method: String,
}

impl WeightMap {
    /// Location of a canonical name.
    pub fn get(&self, name: &str) -> Result<&Located> {
        self.entries
            .get(name)
            .ok_or_else(|| anyhow!("weight `{name}` was not found in the ONNX graph ({})", self.method))
    }
}

/// Canonical source names required by an architecture.
pub fn required_source_names(arch: &Architecture) -> Vec<String> {
    let mut v = vec!["tok_embeddings".to_string(), "norm".to_string()];
    if !arch.tied_embeddings {
        v.push("lm_head".into());
    }
    for i in 0..arch.n_layers as usize {
        for s in ["attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "ffn_up", "ffn_down"] {
            v.push(format!("layers.{i}.{s}"));
        }
        if arch.gated_ffn {
            v.push(format!("layers.{i}.ffn_gate"));
        }
    }
    v
}

/// A mapping from canonical names to initializer names; `{i}` stands for the layer index.
#[derive(Clone, Debug, Deserialize)]
pub struct NamePreset {
    /// Preset name, for messages.
    pub name: String,
    /// Canonical name -> initializer name. Per-layer names are given either exactly
    /// (`layers.3.wq`) or as a pattern with `{i}` for the layer index (`layers.{i}.wq`).
    pub names: BTreeMap<String, String>,
    /// Keys of `names` (exact or pattern) whose initializer is stored `[in, out]`.
    #[serde(default)]
    pub transposed: Vec<String>,
}

impl NamePreset {
    /// Reads a mapping file (JSON, see docs/exporter.md).
    pub fn from_file(path: &Path) -> Result<NamePreset> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading mapping file {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not a valid mapping file", path.display()))
    }

    fn from_pairs(name: &str, pairs: &[(&str, &str)]) -> NamePreset {
        NamePreset {
            name: name.into(),
            names: pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
            transposed: vec![],
        }
    }

    /// Our training script's names (`exporter/python/train_matlm.py`).
    pub fn matlm() -> NamePreset {
        Self::from_pairs(
            "matlm",
            &[
                ("tok_embeddings", "tok_embeddings.weight"),
                ("norm", "norm.weight"),
                ("lm_head", "output.weight"),
                ("layers.{i}.attn_norm", "layers.{i}.attention_norm.weight"),
                ("layers.{i}.wq", "layers.{i}.attention.wq.weight"),
                ("layers.{i}.wk", "layers.{i}.attention.wk.weight"),
                ("layers.{i}.wv", "layers.{i}.attention.wv.weight"),
                ("layers.{i}.wo", "layers.{i}.attention.wo.weight"),
                ("layers.{i}.ffn_norm", "layers.{i}.ffn_norm.weight"),
                ("layers.{i}.ffn_gate", "layers.{i}.feed_forward.w1.weight"),
                ("layers.{i}.ffn_up", "layers.{i}.feed_forward.w3.weight"),
                ("layers.{i}.ffn_down", "layers.{i}.feed_forward.w2.weight"),
            ],
        )
    }

    /// Hugging Face transformers Llama-family names (Llama, Mistral, Qwen2, Gemma).
    pub fn hf_llama() -> NamePreset {
        Self::from_pairs(
            "hf-llama",
            &[
                ("tok_embeddings", "model.embed_tokens.weight"),
                ("norm", "model.norm.weight"),
                ("lm_head", "lm_head.weight"),
                ("layers.{i}.attn_norm", "model.layers.{i}.input_layernorm.weight"),
                ("layers.{i}.wq", "model.layers.{i}.self_attn.q_proj.weight"),
                ("layers.{i}.wk", "model.layers.{i}.self_attn.k_proj.weight"),
                ("layers.{i}.wv", "model.layers.{i}.self_attn.v_proj.weight"),
                ("layers.{i}.wo", "model.layers.{i}.self_attn.o_proj.weight"),
                ("layers.{i}.ffn_norm", "model.layers.{i}.post_attention_layernorm.weight"),
                ("layers.{i}.ffn_gate", "model.layers.{i}.mlp.gate_proj.weight"),
                ("layers.{i}.ffn_up", "model.layers.{i}.mlp.up_proj.weight"),
                ("layers.{i}.ffn_down", "model.layers.{i}.mlp.down_proj.weight"),
            ],
        )
    }

    /// Built-in presets, tried in order.
    pub fn builtin() -> Vec<NamePreset> {
        vec![Self::matlm(), Self::hf_llama()]
    }

    /// Resolves every required name; `Err` lists the first missing ones.
    pub fn resolve(&self, src: &SourceModel, arch: &Architecture) -> Result<WeightMap> {
        let mut entries = BTreeMap::new();
        let mut missing = Vec::new();
        for canonical in required_source_names(arch) {
            // An exact per-layer entry (`layers.3.wq`) wins over the pattern (`layers.{i}.wq`).
            let (pattern_key, layer) = split_layer(&canonical);
            let (key, init_name) = if let Some(exact) = self.names.get(&canonical) {
                (canonical.clone(), exact.clone())
            } else if let Some(pattern) = self.names.get(&pattern_key) {
                let name = match layer {
                    Some(i) => pattern.replace("{i}", &i.to_string()),
                    None => pattern.clone(),
                };
                (pattern_key.clone(), name)
            } else {
                missing.push(format!("{canonical} (no entry `{pattern_key}`)"));
                continue;
            };
            match src.initializer_index.get(&init_name) {
                Some(&idx) => {
                    entries.insert(
                        canonical.clone(),
                        Located { weight: WeightRef::Initializer(idx), transposed: self.transposed.contains(&key) },
                    );
                }
                None => missing.push(format!("{canonical} (initializer `{init_name}`)")),
            }
        }
        if !missing.is_empty() {
            let n = missing.len();
            missing.truncate(3);
            bail!("preset `{}`: {n} weights missing, e.g. {}", self.name, missing.join(", "));
        }
        Ok(WeightMap { entries, method: format!("names: {}", self.name) })
    }
}

/// `layers.3.wq` -> (`layers.{i}.wq`, Some(3)).
fn split_layer(canonical: &str) -> (String, Option<usize>) {
    if let Some(rest) = canonical.strip_prefix("layers.") {
        if let Some((idx, suffix)) = rest.split_once('.') {
            if let Ok(i) = idx.parse::<usize>() {
                return (format!("layers.{{i}}.{suffix}"), Some(i));
            }
        }
    }
    (canonical.to_string(), None)
}

/// How to find the weights.
#[derive(Clone, Debug)]
pub enum Strategy {
    /// Built-in name presets, then graph structure.
    Auto,
    /// A mapping file.
    Mapping(NamePreset),
    /// Graph structure only.
    Structure,
}

/// Finds every weight, by the chosen strategy.
pub fn find_weights(src: &SourceModel, arch: &Architecture, strategy: &Strategy) -> Result<WeightMap> {
    let map = match strategy {
        Strategy::Mapping(p) => p.resolve(src, arch)?,
        Strategy::Structure => find_by_structure(src, arch)?,
        Strategy::Auto => {
            let mut reasons = Vec::new();
            let mut found = None;
            for p in NamePreset::builtin() {
                match p.resolve(src, arch) {
                    Ok(m) => {
                        found = Some(m);
                        break;
                    }
                    Err(e) => reasons.push(format!("{e}")),
                }
            }
            match found {
                Some(m) => m,
                None => find_by_structure(src, arch).with_context(|| {
                    format!(
                        "no name preset matched ({}) and the graph structure was not recognised",
                        reasons.join("; ")
                    )
                })?,
            }
        }
    };
    check_shapes(src, arch, &map)?;
    Ok(map)
}

/// Checks every located weight has the shape the architecture needs.
fn check_shapes(src: &SourceModel, arch: &Architecture, map: &WeightMap) -> Result<()> {
    let d = arch.d_model as i64;
    let q = (arch.n_heads * arch.head_dim) as i64;
    let kv = (arch.n_kv_heads * arch.head_dim) as i64;
    let v = arch.vocab_size as i64;
    for (name, loc) in &map.entries {
        let dims = &src.weight_proto(&loc.weight)?.dims;
        let (_, layer) = split_layer(name);
        let suffix = name.rsplit('.').next().unwrap_or(name);
        let canonical: Option<Vec<i64>> = match (suffix, layer) {
            ("tok_embeddings" | "lm_head", None) => Some(vec![v, d]),
            ("norm", None) | ("attn_norm" | "ffn_norm", Some(_)) => Some(vec![d]),
            ("wq", Some(_)) => Some(vec![q, d]),
            ("wk" | "wv", Some(_)) => Some(vec![kv, d]),
            ("wo", Some(_)) => Some(vec![d, q]),
            ("ffn_up" | "ffn_gate", Some(_)) | ("ffn_down", Some(_)) => None,
            _ => None,
        };
        let stored: Vec<i64> = if loc.transposed && dims.len() == 2 { vec![dims[1], dims[0]] } else { dims.clone() };
        if let Some(c) = canonical {
            if stored != c {
                bail!(
                    "weight `{name}` (`{}`) has shape {dims:?}{}, the config needs {c:?}",
                    src.weight_name(&loc.weight),
                    if loc.transposed { " (stored transposed)" } else { "" }
                );
            }
        } else if stored.len() != 2
            || (suffix == "ffn_down" && stored[0] != d)
            || (suffix != "ffn_down" && stored[1] != d)
        {
            bail!(
                "FFN weight `{name}` (`{}`) has shape {dims:?}, not [ffn_width, d_model={d}]",
                src.weight_name(&loc.weight)
            );
        }
    }
    Ok(())
}

/// Dataflow indices of a graph.
struct Graph<'a> {
    g: &'a pb::GraphProto,
    producer: HashMap<&'a str, usize>,
    consumers: HashMap<&'a str, Vec<(usize, usize)>>,
    initializers: HashMap<&'a str, usize>,
}

const PASS_THROUGH: [&str; 4] = ["Cast", "Identity", "Reshape", "Unsqueeze"];

impl<'a> Graph<'a> {
    fn new(g: &'a pb::GraphProto) -> Graph<'a> {
        let mut producer = HashMap::new();
        let mut consumers: HashMap<&str, Vec<(usize, usize)>> = HashMap::new();
        for (i, n) in g.node.iter().enumerate() {
            for o in &n.output {
                producer.insert(o.as_str(), i);
            }
            for (slot, inp) in n.input.iter().enumerate() {
                consumers.entry(inp.as_str()).or_default().push((i, slot));
            }
        }
        let initializers = g.initializer.iter().enumerate().map(|(i, t)| (t.name.as_str(), i)).collect();
        Graph { g, producer, consumers, initializers }
    }

    /// Follows `tensor` back through Transpose / Cast / Identity to a constant.
    /// Returns the constant and the number of 2-D transposes on the way.
    fn resolve_const(&self, tensor: &str) -> Option<(WeightRef, u32, Vec<i64>)> {
        let mut t = tensor;
        let mut transposes = 0;
        for _ in 0..8 {
            if let Some(&i) = self.initializers.get(t) {
                return Some((WeightRef::Initializer(i), transposes, self.g.initializer[i].dims.clone()));
            }
            let &p = self.producer.get(t)?;
            let node = &self.g.node[p];
            match node.op_type.as_str() {
                "Constant" => {
                    let v = constant_value(node)?;
                    return Some((WeightRef::ConstantNode(p), transposes, v.dims.clone()));
                }
                "Transpose" => {
                    let perm = node.attribute.iter().find(|a| a.name == "perm").map(|a| a.ints.clone());
                    if !(perm.is_none() || perm == Some(vec![1, 0])) {
                        return None;
                    }
                    transposes += 1;
                }
                "Cast" | "Identity" => {}
                _ => return None,
            }
            t = node.input.first()?;
        }
        None
    }

    /// Walks back from an activation tensor through shape-only ops to its real source.
    fn activation_source(&self, tensor: &'a str) -> &'a str {
        let mut t = tensor;
        for _ in 0..8 {
            match self.producer.get(t) {
                Some(&p) if PASS_THROUGH.contains(&self.g.node[p].op_type.as_str()) => {
                    t = self.g.node[p].input[0].as_str();
                }
                _ => break,
            }
        }
        t
    }

    fn is_const(&self, tensor: &str) -> bool {
        self.resolve_const(tensor).is_some()
    }

    /// Breadth-first from `tensor` through consumers, stopping at (and collecting) nodes for
    /// which `stop` is true; at most `max_nodes` visited.
    fn reach(&self, tensor: &str, stop: impl Fn(&pb::NodeProto) -> bool, max_nodes: usize) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let mut queue: VecDeque<&str> = VecDeque::from([tensor]);
        let mut visited = 0;
        while let Some(t) = queue.pop_front() {
            for &(n, slot) in self.consumers.get(t).map(|v| v.as_slice()).unwrap_or(&[]) {
                if !seen.insert((n, slot)) {
                    continue;
                }
                visited += 1;
                if visited > max_nodes {
                    return out;
                }
                let node = &self.g.node[n];
                if stop(node) {
                    out.push((n, slot));
                } else {
                    for o in &node.output {
                        queue.push_back(o.as_str());
                    }
                }
            }
        }
        out
    }
}

/// One MatMul/Gemm with a constant weight.
#[derive(Clone, Debug)]
struct LinearUse {
    node: usize,
    weight: WeightRef,
    transposed: bool,
    source: String,
    output: String,
}

/// Recognises a Llama-style decoder (pre-norm, attention q/k/v/o, gated or plain FFN) by
/// dataflow, without relying on any names.
pub fn find_by_structure(src: &SourceModel, arch: &Architecture) -> Result<WeightMap> {
    let g = Graph::new(src.graph());
    let d = arch.d_model as i64;
    let n_layers = arch.n_layers as usize;
    let mut entries = BTreeMap::new();

    // Embedding: a Gather whose data is a [vocab, d_model] constant.
    let emb =
        g.g.node
            .iter()
            .find_map(|n| {
                if n.op_type != "Gather" {
                    return None;
                }
                let (w, t, dims) = g.resolve_const(n.input.first()?)?;
                (t == 0 && dims == [arch.vocab_size as i64, d]).then_some(w)
            })
            .ok_or_else(|| anyhow!("no embedding Gather over a [{}, {d}] constant", arch.vocab_size))?;
    entries.insert("tok_embeddings".to_string(), Located { weight: emb.clone(), transposed: false });

    // Linear layers in topological order.
    let mut uses = Vec::new();
    for (i, n) in g.g.node.iter().enumerate() {
        let (w_slot, extra_t) = match n.op_type.as_str() {
            "MatMul" => (1, 0),
            "Gemm" => {
                let tb = n.attribute.iter().find(|a| a.name == "transB").map(|a| a.i).unwrap_or(0);
                (1, tb as u32)
            }
            _ => continue,
        };
        let Some(w_in) = n.input.get(w_slot) else { continue };
        let Some((w, t, dims)) = g.resolve_const(w_in) else { continue };
        if dims.len() != 2 {
            continue;
        }
        // MatMul(x, W): W is [in, out] after `t` transposes of the stored tensor.
        let transposed = (t + extra_t) % 2 == 0;
        uses.push(LinearUse {
            node: i,
            weight: w,
            transposed,
            source: g.activation_source(&n.input[0]).to_string(),
            output: n.output[0].clone(),
        });
    }
    // Group by activation source, keeping first-appearance order.
    let mut groups: Vec<Vec<LinearUse>> = Vec::new();
    for u in uses {
        match groups.iter_mut().find(|gr| gr[0].source == u.source) {
            Some(gr) => gr.push(u),
            None => groups.push(vec![u]),
        }
    }
    let per_layer: &[usize] = if arch.gated_ffn { &[3, 1, 2, 1] } else { &[3, 1, 1, 1] };
    let sizes: Vec<usize> = groups.iter().map(Vec::len).collect();
    let expected_groups = n_layers * 4 + usize::from(!arch.tied_embeddings || sizes.len() > n_layers * 4);
    if sizes.len() < n_layers * 4
        || sizes.len() > expected_groups
        || (0..n_layers * 4).any(|k| sizes[k] != per_layer[k % 4])
    {
        bail!(
            "graph structure not recognised: expected per layer linear groups {per_layer:?} x {n_layers} (+ LM head), found {sizes:?}"
        );
    }
    let is_softmax = |n: &pb::NodeProto| n.op_type == "Softmax";
    let is_act_matmul = |n: &pb::NodeProto| n.op_type == "MatMul" && n.input.iter().all(|i| !g.is_const(i));
    for layer in 0..n_layers {
        let qkv = &groups[layer * 4];
        // Each projection's first activation x activation MatMul: q and k meet in the scores
        // MatMul (q in slot 0, k in slot 1); v enters the probabilities x V MatMul.
        let hits: Vec<(usize, usize)> = qkv
            .iter()
            .map(|u| {
                g.reach(&u.output, is_act_matmul, 200)
                    .first()
                    .copied()
                    .ok_or_else(|| anyhow!("layer {layer}: projection output reaches no attention MatMul"))
            })
            .collect::<Result<_>>()?;
        let mut names: [Option<&str>; 3] = [None; 3];
        for a in 0..3 {
            let shared = (0..3).filter(|&b| b != a && hits[b].0 == hits[a].0).count();
            names[a] = Some(match (shared, hits[a].1) {
                (1, 0) => "wq",
                (1, _) => "wk",
                (0, _) => "wv",
                _ => bail!("layer {layer}: cannot tell q, k and v apart"),
            });
        }
        // Sanity: the v MatMul consumes softmax output.
        let v_idx =
            names.iter().position(|n| *n == Some("wv")).ok_or_else(|| anyhow!("layer {layer}: no v projection"))?;
        let sm = g.g.node.iter().enumerate().filter(|(_, n)| is_softmax(n)).map(|(i, _)| i).collect::<Vec<_>>();
        let av_node = hits[v_idx].0;
        let fed_by_softmax =
            sm.iter().any(|&s| g.reach(&g.g.node[s].output[0], is_act_matmul, 50).iter().any(|h| h.0 == av_node));
        if !fed_by_softmax {
            bail!("layer {layer}: the value projection does not meet the attention probabilities");
        }
        for (u, n) in qkv.iter().zip(names) {
            let n = n.unwrap_or("wv");
            if entries
                .insert(format!("layers.{layer}.{n}"), Located { weight: u.weight.clone(), transposed: u.transposed })
                .is_some()
            {
                bail!("layer {layer}: two projections classified as {n}");
            }
        }
        let o = &groups[layer * 4 + 1][0];
        entries.insert(format!("layers.{layer}.wo"), Located { weight: o.weight.clone(), transposed: o.transposed });
        let ffn_in = &groups[layer * 4 + 2];
        if arch.gated_ffn {
            let acts = ["Sigmoid", "Silu", "Gelu", "Erf", "Tanh", "HardSigmoid", "HardSwish"];
            let reaches_act = |u: &LinearUse| {
                !g.reach(&u.output, |n| acts.contains(&n.op_type.as_str()) || n.op_type == "MatMul", 50)
                    .iter()
                    .all(|&(n, _)| g.g.node[n].op_type == "MatMul")
            };
            let flags: Vec<bool> = ffn_in.iter().map(reaches_act).collect();
            let (gate, up) = match flags.as_slice() {
                [true, false] => (&ffn_in[0], &ffn_in[1]),
                [false, true] => (&ffn_in[1], &ffn_in[0]),
                _ => bail!("layer {layer}: cannot tell the FFN gate from the up projection"),
            };
            entries.insert(
                format!("layers.{layer}.ffn_gate"),
                Located { weight: gate.weight.clone(), transposed: gate.transposed },
            );
            entries.insert(
                format!("layers.{layer}.ffn_up"),
                Located { weight: up.weight.clone(), transposed: up.transposed },
            );
        } else {
            let up = &ffn_in[0];
            entries.insert(
                format!("layers.{layer}.ffn_up"),
                Located { weight: up.weight.clone(), transposed: up.transposed },
            );
        }
        let down = &groups[layer * 4 + 3][0];
        entries.insert(
            format!("layers.{layer}.ffn_down"),
            Located { weight: down.weight.clone(), transposed: down.transposed },
        );
        let _ = qkv[0].node;
    }
    if !arch.tied_embeddings {
        let head = groups
            .get(n_layers * 4)
            .and_then(|g| g.first())
            .ok_or_else(|| anyhow!("no LM head MatMul after the last layer"))?;
        if head.weight == emb {
            bail!("the LM head reuses the embedding but the config says tied_embeddings = false");
        }
        entries.insert("lm_head".to_string(), Located { weight: head.weight.clone(), transposed: head.transposed });
    }

    // Norm weights: Mul by (or *Normalization scale) a [d_model] constant, in order.
    let mut norms = Vec::new();
    for n in &g.g.node {
        let cand: Vec<&String> = match n.op_type.as_str() {
            "Mul" => n.input.iter().collect(),
            "LayerNormalization" | "SimplifiedLayerNormalization" | "RMSNormalization" => {
                n.input.get(1).into_iter().collect()
            }
            _ => continue,
        };
        for inp in cand {
            if let Some((w, 0, dims)) = g.resolve_const(inp) {
                if dims == [d] && !norms.contains(&w) {
                    norms.push(w);
                }
            }
        }
    }
    if norms.len() != 2 * n_layers + 1 {
        bail!(
            "graph structure not recognised: expected {} norm weights of [{d}], found {}",
            2 * n_layers + 1,
            norms.len()
        );
    }
    for layer in 0..n_layers {
        entries.insert(
            format!("layers.{layer}.attn_norm"),
            Located { weight: norms[2 * layer].clone(), transposed: false },
        );
        entries.insert(
            format!("layers.{layer}.ffn_norm"),
            Located { weight: norms[2 * layer + 1].clone(), transposed: false },
        );
    }
    entries.insert("norm".to_string(), Located { weight: norms[2 * n_layers].clone(), transposed: false });
    Ok(WeightMap { entries, method: "graph structure".into() })
}
