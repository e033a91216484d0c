// Gemma 3n's per-layer input gate of one layer, one workgroup per token row, in place on
// gate [t, stride] (the layer's ple.gate product): the per-layer input
// in = (rmsnorm(proj * proj_scale, w) + rows[row_offset ..] * table_scale) * input_scale
// (proj: the layer's block of per_layer_model_projection applied to the embeddings; rows: the
// token's row of per_layer_embeddings, read on the host), then gate = gelu_tanh(gate) * in.

const WG: u32 = 64u;

struct Params {
    dim: u32,
    stride: u32,
    row_stride: u32,
    row_offset: u32,
    proj_scale: f32,
    table_scale: f32,
    input_scale: f32,
    eps: f32,
}

struct Step {
    pos0: u32,
    t: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> proj: array<f32>;
@group(0) @binding(3) var<storage, read> rows: array<f32>;
@group(0) @binding(4) var<storage, read> w: array<f32>;
@group(0) @binding(5) var<storage, read_write> gate: array<f32>;

var<workgroup> red: array<f32, WG>;

fn gelu(x: f32) -> f32 {
    // tanh saturates to +-1 in f32 beyond |10|; clamping avoids inf/inf in some tanh implementations.
    let a = clamp(0.7978846 * (x + 0.044715 * x * x * x), -10.0, 10.0);
    return 0.5 * x * (1.0 + tanh(a));
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let lid = lid3.x;
    let b = wid.x * p.stride;
    let rb = wid.x * p.row_stride + p.row_offset;
    var s = 0.0;
    for (var c = lid; c < p.dim; c += WG) {
        let v = proj[b + c] * p.proj_scale;
        s += v * v;
    }
    red[lid] = s;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if lid < k {
            red[lid] += red[lid + k];
        }
        workgroupBarrier();
    }
    let r = 1.0 / sqrt(red[0] / f32(p.dim) + p.eps);
    for (var c = lid; c < p.dim; c += WG) {
        let n = proj[b + c] * p.proj_scale * r * w[c];
        let input = (n + rows[rb + c] * p.table_scale) * p.input_scale;
        gate[b + c] = gelu(gate[b + c]) * input;
    }
}
