// LayerNorm of rows of x: out = (x - mean) / sqrt(var + eps) * w + b (biased variance, the
// CPU engine's order). One workgroup per row; shared-memory reductions. last_only as in
// rmsnorm.wgsl.

const WG: u32 = 64u;

struct Params {
    cols: u32,
    in_stride: u32,
    out_stride: u32,
    last_only: u32,
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
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> w: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read> b: array<f32>;

var<workgroup> red: array<f32, WG>;

fn reduce_sum(v: f32, lane: u32) -> f32 {
    red[lane] = v;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if lane < k {
            red[lane] += red[lane + k];
        }
        workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    var in_row = wid.x;
    var out_row = wid.x;
    if p.last_only != 0u {
        in_row = step.t - 1u;
        out_row = 0u;
    }
    let xb = in_row * p.in_stride;
    let n = f32(p.cols);
    var s = 0.0;
    for (var c = lid.x; c < p.cols; c += WG) {
        s += x[xb + c];
    }
    let mean = reduce_sum(s, lid.x) / n;
    var s2 = 0.0;
    for (var c = lid.x; c < p.cols; c += WG) {
        let d = x[xb + c] - mean;
        s2 += d * d;
    }
    let variance = reduce_sum(s2, lid.x) / n;
    let r = 1.0 / sqrt(variance + p.eps);
    let ob = out_row * p.out_stride;
    for (var c = lid.x; c < p.cols; c += WG) {
        out[ob + c] = (x[xb + c] - mean) * r * w[c] + b[c];
    }
}
