// Gemma 3n AltUp, one workgroup per token row. The residual stream is `n` streams of `d`
// floats: stream j of row i is at h[j * stream + i * stride].
//
// predict: the router's modalities m = tanh(router . (rmsnorm(h[0], router_norm) / d)), the
// coefficients coef[c * n + r] = prediction[c * n + r] . m, then
// pred[c] = sum_r coef[c * n + r] * h[r] + h[c] (the CPU engine's order).
// correct: m from the activated row `act` instead, c_k = correction[k] . m + 1, then
// h[k] = pred[k] + c_k * (act - pred[0]), and `first` = h[0] (times correct_scale when
// SCALE), the input of the per-layer gate.
//
// w holds the layer's small tensors: router_norm [d] at 0, router [n, d] at o_router,
// prediction [n * n, n] at o_pred, correction [n, n] at o_corr, correct_scale [d] at o_scale.

const WG: u32 = 64u;
const MAX_N: u32 = 16u;

override SCALE: bool = true;

struct Params {
    d: u32,
    n: u32,
    stream: u32,
    stride: u32,
    o_router: u32,
    o_pred: u32,
    o_corr: u32,
    o_scale: u32,
    eps: f32,
    inv_d: f32,
    _pad0: u32,
    _pad1: u32,
}

struct Step {
    pos0: u32,
    t: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read_write> h: array<f32>;
@group(0) @binding(3) var<storage, read_write> pred: array<f32>;
@group(0) @binding(4) var<storage, read> act: array<f32>;
@group(0) @binding(5) var<storage, read> w: array<f32>;
@group(0) @binding(6) var<storage, read_write> first: array<f32>;

var<workgroup> red: array<f32, WG>;
var<workgroup> modal: array<f32, MAX_N>;
var<workgroup> coef: array<f32, 256>;

fn reduce_sum(v: f32, lid: u32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if lid < k {
            red[lid] += red[lid + k];
        }
        workgroupBarrier();
    }
    let s = red[0];
    workgroupBarrier();
    return s;
}

fn tanh_clamped(x: f32) -> f32 {
    // tanh is +-1 in f32 beyond |10|; the clamp avoids inf/inf in some implementations.
    return tanh(clamp(x, -10.0, 10.0));
}

// The router's modalities of row `b` of `x_is_act ? act : h[0]` into `modal`.
fn modalities(b: u32, x_is_act: bool, lid: u32) {
    var s = 0.0;
    for (var c = lid; c < p.d; c += WG) {
        var v = h[b + c];
        if x_is_act {
            v = act[b + c];
        }
        s += v * v;
    }
    let ms = reduce_sum(s, lid) / f32(p.d);
    let r = 1.0 / sqrt(ms + p.eps);
    for (var k = 0u; k < p.n; k++) {
        var acc = 0.0;
        for (var c = lid; c < p.d; c += WG) {
            var v = h[b + c];
            if x_is_act {
                v = act[b + c];
            }
            let normed = v * r * w[c];
            acc += w[p.o_router + k * p.d + c] * (normed * p.inv_d);
        }
        let dot = reduce_sum(acc, lid);
        if lid == 0u {
            modal[k] = tanh_clamped(dot);
        }
    }
    workgroupBarrier();
}

@compute @workgroup_size(WG)
fn predict(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let lid = lid3.x;
    let b = wid.x * p.stride;
    modalities(b, false, lid);
    let nn = p.n * p.n;
    for (var kk = lid; kk < nn; kk += WG) {
        var s = 0.0;
        for (var k = 0u; k < p.n; k++) {
            s += w[p.o_pred + kk * p.n + k] * modal[k];
        }
        coef[kk] = s;
    }
    workgroupBarrier();
    for (var c = 0u; c < p.n; c++) {
        for (var e = lid; e < p.d; e += WG) {
            var o = 0.0;
            for (var r = 0u; r < p.n; r++) {
                o += coef[c * p.n + r] * h[r * p.stream + b + e];
            }
            o += h[c * p.stream + b + e];
            pred[c * p.stream + b + e] = o;
        }
    }
}

@compute @workgroup_size(WG)
fn correct(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let lid = lid3.x;
    let b = wid.x * p.stride;
    modalities(b, true, lid);
    for (var k = lid; k < p.n; k += WG) {
        var s = 0.0;
        for (var j = 0u; j < p.n; j++) {
            s += w[p.o_corr + k * p.n + j] * modal[j];
        }
        coef[k] = s + 1.0;
    }
    workgroupBarrier();
    for (var e = lid; e < p.d; e += WG) {
        let a = act[b + e];
        let p0 = pred[b + e];
        for (var k = 0u; k < p.n; k++) {
            h[k * p.stream + b + e] = pred[k * p.stream + b + e] + coef[k] * (a - p0);
        }
        var f = h[b + e];
        if SCALE {
            f *= w[p.o_scale + e];
        }
        first[b + e] = f;
    }
}
