// RMSNorm of rows of x: out = x / sqrt(mean(x^2) + eps) * w (the CPU engine's formula and
// order: x * r * w). One workgroup per row; shared-memory reduction.
// With last_only, the single workgroup normalises row t - 1 into row 0 of out (final norm
// before the LM head when only the last token's logits are wanted).

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

var<workgroup> red: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    var in_row = wid.x;
    var out_row = wid.x;
    if p.last_only != 0u {
        in_row = step.t - 1u;
        out_row = 0u;
    }
    let xb = in_row * p.in_stride;
    var s = 0.0;
    for (var c = lid.x; c < p.cols; c += WG) {
        let v = x[xb + c];
        s += v * v;
    }
    red[lid.x] = s;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if lid.x < k {
            red[lid.x] += red[lid.x + k];
        }
        workgroupBarrier();
    }
    let ms = red[0] / f32(p.cols);
    let r = 1.0 / sqrt(ms + p.eps);
    let ob = out_row * p.out_stride;
    for (var c = lid.x; c < p.cols; c += WG) {
        out[ob + c] = x[xb + c] * r * w[c];
    }
}
