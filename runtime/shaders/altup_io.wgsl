// Gemma 3n AltUp stream setup and unembedding. Streams as in altup.wgsl: stream j of row i at
// j * stream + i * stride.
//
// match_rms (one workgroup per row): dst stream `j` row i is rescaled to the RMS of src row i
// (x * target / max(rms, sqrt(1e-5)), the CPU engine's match_magnitude): the extra streams
// after altup_proj.
// gather (x over d, y over streams): row t - 1 of every stream of src into row 0 of dst.
// accumulate (one workgroup per row): u row i rescaled to the RMS of src stream 0 row i, added
// to dst row i (FIRST: to src stream 0 row i), the sum times `scale` (1 / n for the last
// stream). Without HAS_U only the base is taken (one stream).

const WG: u32 = 64u;
const MIN_MEAN_SQUARE: f32 = 1e-5;

override FIRST: bool = false;
override HAS_U: bool = true;

struct Params {
    d: u32,
    n: u32,
    stream: u32,
    stride: u32,
    j: u32,
    scale: f32,
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
@group(0) @binding(2) var<storage, read> src: array<f32>;
@group(0) @binding(3) var<storage, read> u: array<f32>;
@group(0) @binding(4) var<storage, read_write> dst: array<f32>;

var<workgroup> red: array<f32, WG>;

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

@compute @workgroup_size(WG)
fn match_rms(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let lid = lid3.x;
    let b = wid.x * p.stride;
    let o = p.j * p.stream + b;
    var s = 0.0;
    var sd = 0.0;
    for (var c = lid; c < p.d; c += WG) {
        let x = src[b + c];
        s += x * x;
        let y = dst[o + c];
        sd += y * y;
    }
    let target_rms = sqrt(reduce_sum(s, lid) / f32(p.d));
    let r = sqrt(max(reduce_sum(sd, lid) / f32(p.d), MIN_MEAN_SQUARE));
    for (var c = lid; c < p.d; c += WG) {
        dst[o + c] = dst[o + c] * target_rms / r;
    }
}

@compute @workgroup_size(64)
fn gather(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let j = gid.y;
    if c >= p.d || j >= p.n {
        return;
    }
    dst[j * p.stream + c] = src[j * p.stream + (step.t - 1u) * p.stride + c];
}

@compute @workgroup_size(WG)
fn accumulate(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let lid = lid3.x;
    let b = wid.x * p.stride;
    var s = 0.0;
    var su = 0.0;
    for (var c = lid; c < p.d; c += WG) {
        let x = src[b + c];
        s += x * x;
        if HAS_U {
            let y = u[b + c];
            su += y * y;
        }
    }
    let target_rms = sqrt(reduce_sum(s, lid) / f32(p.d));
    let r = sqrt(max(reduce_sum(su, lid) / f32(p.d), MIN_MEAN_SQUARE));
    for (var c = lid; c < p.d; c += WG) {
        var acc = 0.0;
        if FIRST {
            acc = src[b + c];
        } else {
            acc = dst[b + c];
        }
        if HAS_U {
            acc = acc + u[b + c] * target_rms / r;
        }
        dst[b + c] = acc * p.scale;
    }
}
