// Gemma 3n's RMSNorms fused with the residual combinations that follow them, one workgroup per
// row. n = rmsnorm(x, w) = x * r * w with r = 1 / sqrt(mean(x^2) + eps) (the CPU engine's
// order), then by MODE:
// 0 (LAuReL): out = n + y;
// 1 (attention): out = (y + n + z) * (1 / sqrt(2)) (y: the active prediction, z: LAuReL);
// 2 (FFN): out = out + n, and x is zeroed (the FFN-down product accumulates into it);
// 3 (per-layer input): streams 1..n_streams of out (stream stride `stream`) += n.

const WG: u32 = 64u;
const FRAC_1_SQRT_2: f32 = 0.70710677;

override MODE: u32 = 0u;

struct Params {
    cols: u32,
    stride: u32,
    n_streams: u32,
    stream: u32,
    eps: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

struct Step {
    pos0: u32,
    t: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read_write> x: array<f32>;
@group(0) @binding(3) var<storage, read> w: array<f32>;
@group(0) @binding(4) var<storage, read> y: array<f32>;
@group(0) @binding(5) var<storage, read> z: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;

var<workgroup> red: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let lid = lid3.x;
    let b = wid.x * p.stride;
    var s = 0.0;
    for (var c = lid; c < p.cols; c += WG) {
        let v = x[b + c];
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
    let r = 1.0 / sqrt(red[0] / f32(p.cols) + p.eps);
    for (var c = lid; c < p.cols; c += WG) {
        let n = x[b + c] * r * w[c];
        if MODE == 0u {
            out[b + c] = n + y[b + c];
        } else if MODE == 1u {
            out[b + c] = (y[b + c] + n + z[b + c]) * FRAC_1_SQRT_2;
        } else if MODE == 2u {
            out[b + c] = out[b + c] + n;
            x[b + c] = 0.0;
        } else {
            for (var j = 1u; j < p.n_streams; j++) {
                let o = j * p.stream + b + c;
                out[o] = out[o] + n;
            }
        }
    }
}
