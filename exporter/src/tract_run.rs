//! Running a source ONNX graph in tract-onnx, including the graphs current PyTorch writes
//! (`torch.onnx.export(..., dynamo=True)`), which tract-onnx 0.23 does not load as they are.
//!
//! What it takes, each for a reason found on transformers' `LlamaForCausalLM` exports:
//!
//! * **Concrete input facts.** The token input is fixed to `[1, len]` (the probe's length)
//!   before analysis, so every shape computation in the graph (`Shape`, `Range`, masks,
//!   position ids) folds to constants. A graph whose sequence axis was exported static only
//!   accepts that length: [`fixed_sequence_len`] reads it so probes can be cut to it.
//! * **Declared facts ignored.** The graph's `value_info` and output shapes are dropped: they
//!   describe the full FFN width (verification runs sliced copies) and name symbolic dims
//!   that would conflict with the concrete input.
//! * **`CumSum` over shape values.** tract-onnx turns `Cast(to=int64)` into a cast to its
//!   symbolic-dimension type (`TDim`) so shape arithmetic stays exact, but its `CumSum`
//!   evaluates numbers only and fails with "TDim is not a number". transformers computes
//!   packed-sequence ids as `cumsum(position_ids diff != 1)` in int64: [`CumSumOverDims`]
//!   replaces the op, running the sum in i64 and casting back, which is exact for the concrete
//!   dims concrete input facts produce.
//! * **Simplification is optional.** tract's decluttering and optimisation are speed-ups; if
//!   one of their rewrites fails on a graph tract can type, the typed graph runs unsimplified
//!   (a note on stderr says so).
//!
//! An op tract does not have is reported by name, with `--verify-goldens` as the way to verify
//! against PyTorch instead.

use std::collections::BTreeSet;

use anyhow::{anyhow, bail, Context, Result};
use tract_onnx::model::ParsingContext;
use tract_onnx::pb;
use tract_onnx::tract_hir::internal::*;

/// `CumSum` that also sums shape values (tract's `TDim` tensors) by casting them to i64 and
/// back; numbers are summed as tract-onnx does.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct CumSumOverDims {
    /// ONNX `reverse`.
    pub reverse: bool,
    /// ONNX `exclusive`.
    pub exclusive: bool,
}

fn cumsum_builder(_ctx: &ParsingContext, node: &pb::NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let reverse = node.get_attr_opt::<i64>("reverse")? == Some(1);
    let exclusive = node.get_attr_opt::<i64>("exclusive")? == Some(1);
    Ok((expand(CumSumOverDims { reverse, exclusive }), vec![]))
}

impl Expansion for CumSumOverDims {
    fn name(&self) -> StaticName {
        "CumSumOverDims".into()
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let axis = model.outlet_fact(inputs[1])?.konst.as_ref().context("CumSum: axis must be a constant")?;
        let axis = axis.cast_to_scalar::<i64>()?;
        let fact = model.outlet_fact(inputs[0])?.clone();
        let rank = fact.rank() as i64;
        if axis < -rank || axis >= rank {
            bail!("CumSum: axis {axis} out of range for rank {rank}");
        }
        let axis = if axis < 0 { axis + rank } else { axis } as usize;
        let op = tract_onnx::tract_core::ops::array::CumSum { axis, exclusive: self.exclusive, reverse: self.reverse };
        if fact.datum_type == TDim::datum_type() {
            let as_i64 = model.wire_node(
                format!("{prefix}.to_i64"),
                tract_onnx::tract_core::ops::cast::cast(i64::datum_type()),
                &[inputs[0]],
            )?;
            let summed = model.wire_node(format!("{prefix}.cumsum"), op, &as_i64)?;
            model.wire_node(prefix, tract_onnx::tract_core::ops::cast::cast(TDim::datum_type()), &summed)
        } else {
            model.wire_node(prefix, op, &[inputs[0]])
        }
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 2)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, &outputs[0].datum_type)?;
        s.equals(&inputs[0].shape, &outputs[0].shape)?;
        s.equals(&inputs[1].rank, 0)?;
        Ok(())
    }
}

/// tract-onnx with the replacements above and the graph's declared shapes ignored.
pub fn framework() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx().with_ignore_output_shapes(true).with_ignore_value_info(true);
    onnx.op_register.insert("CumSum", cumsum_builder);
    onnx
}

/// ONNX ops (default domain) in `proto` that tract-onnx does not register.
pub fn unsupported_ops(proto: &pb::ModelProto) -> BTreeSet<String> {
    let onnx = framework();
    let mut missing = BTreeSet::new();
    let mut graphs: Vec<&pb::GraphProto> = proto.graph.iter().collect();
    while let Some(g) = graphs.pop() {
        for node in &g.node {
            let known = node.domain.is_empty() || node.domain == "ai.onnx";
            if !known || !onnx.op_register.0.contains_key(&node.op_type) {
                let name = if node.domain.is_empty() {
                    node.op_type.clone()
                } else {
                    format!("{}:{}", node.domain, node.op_type)
                };
                missing.insert(name);
            }
            for a in &node.attribute {
                graphs.extend(a.g.iter());
                graphs.extend(a.graphs.iter());
            }
        }
    }
    missing
}

/// The graph's token input: the first graph input that is not an initializer, with its
/// element type (ONNX code; 7 = int64, 6 = int32) and declared dims (`None` for symbolic).
pub fn token_input(proto: &pb::ModelProto) -> Result<(String, i32, Vec<Option<i64>>)> {
    let g = proto.graph.as_ref().ok_or_else(|| anyhow!("the ONNX file has no graph"))?;
    let initializers: BTreeSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<&pb::ValueInfoProto> = g.input.iter().filter(|i| !initializers.contains(i.name.as_str())).collect();
    let input = match inputs.as_slice() {
        [one] => *one,
        [] => bail!("the ONNX graph has no input"),
        more => bail!(
            "the ONNX graph has {} inputs ({}); verification feeds token ids only",
            more.len(),
            more.iter().map(|i| i.name.as_str()).collect::<Vec<_>>().join(", ")
        ),
    };
    let Some(pb::type_proto::Value::TensorType(tt)) = input.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        bail!("ONNX input `{}` is not a tensor", input.name);
    };
    let dims = tt
        .shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match d.value {
                    Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) => Some(v),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok((input.name.clone(), tt.elem_type, dims))
}

/// The sequence length a graph exported with a static sequence axis accepts (`[1, 7]` gives
/// 7), or `None` when the axis is dynamic.
pub fn fixed_sequence_len(proto: &pb::ModelProto) -> Result<Option<usize>> {
    let (_, _, dims) = token_input(proto)?;
    Ok(match dims.as_slice() {
        [_, Some(len)] if *len > 0 => Some(*len as usize),
        _ => None,
    })
}

/// Loads `proto` into tract with the token input fixed to `[1, len]`, and makes it runnable.
/// Each step's failure is named; an op tract does not have is named with the way out.
pub fn runnable(proto: &pb::ModelProto, len: usize) -> Result<std::sync::Arc<TypedRunnableModel>> {
    let missing = unsupported_ops(proto);
    if !missing.is_empty() {
        bail!(
            "tract-onnx has no implementation of ONNX op(s) {}: the graph cannot be run for \
             verification; verify against PyTorch goldens instead (--verify-goldens FILE, format in docs/exporter.md)",
            missing.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    let (name, elem_type, dims) = token_input(proto)?;
    if let Some(fixed) = fixed_sequence_len(proto)? {
        if fixed != len {
            bail!("the ONNX input `{name}` has a static sequence length of {fixed}, asked to run {len} tokens");
        }
    }
    if !(dims.is_empty() || dims.len() == 2) || dims.first().is_some_and(|b| b.is_some_and(|b| b != 1)) {
        bail!("the ONNX input `{name}` has shape {dims:?}; expected [1, sequence] token ids");
    }
    let dt = match elem_type {
        7 => i64::datum_type(),
        6 => i32::datum_type(),
        other => bail!("the ONNX input `{name}` has element type {other}; expected int64 (7) or int32 (6) token ids"),
    };
    let model = framework()
        .model_for_proto_model(proto)
        .map_err(|e| anyhow!("{e:#}"))
        .context("tract could not load the ONNX graph")?
        .with_input_fact(0, InferenceFact::dt_shape(dt, tvec![1, len]))
        .map_err(|e| anyhow!("{e:#}"))?;
    let typed = model.into_typed().map_err(|e| anyhow!("{e:#}")).context("tract could not type the ONNX graph")?;
    // Decluttering and optimising only speed the graph up; when one of tract's rewrites fails
    // on a graph it can type, the typed graph runs as it is (each op evaluated as typed).
    let simplified = typed.clone().into_decluttered().and_then(|m| m.into_optimized());
    let model = match simplified {
        Ok(m) => m,
        Err(e) => {
            eprintln!("note: tract could not simplify the ONNX graph ({e:#}); running it unsimplified");
            typed
        }
    };
    model.into_runnable().map_err(|e| anyhow!("{e:#}")).context("tract could not plan the ONNX graph")
}

/// Runs a plan from [`runnable`] on one sequence of token ids; returns the first output as f32.
pub fn run(plan: &std::sync::Arc<TypedRunnableModel>, proto: &pb::ModelProto, ids: &[u32]) -> Result<Vec<f32>> {
    let (_, elem_type, _) = token_input(proto)?;
    let len = ids.len();
    let input: Tensor = if elem_type == 6 {
        Tensor::from_shape(&[1, len], &ids.iter().map(|&t| t as i32).collect::<Vec<_>>())
    } else {
        Tensor::from_shape(&[1, len], &ids.iter().map(|&t| i64::from(t)).collect::<Vec<_>>())
    }
    .map_err(|e| anyhow!("{e:#}"))?;
    let result =
        plan.run(tvec![input.into()]).map_err(|e| anyhow!("{e:#}")).context("tract failed to run the ONNX graph")?;
    let first = result.first().ok_or_else(|| anyhow!("the ONNX graph has no output"))?;
    let logits = first.cast_to::<f32>().map_err(|e| anyhow!("{e:#}"))?;
    let view = logits.to_plain_array_view::<f32>().map_err(|e| anyhow!("{e:#}"))?;
    Ok(view.iter().copied().collect())
}
