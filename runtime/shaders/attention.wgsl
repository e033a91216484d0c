// Causal softmax attention over the GPU-resident KV cache, grouped-query: one workgroup per
// (query head, query token). Query token i (position pos0 + i) attends to cache positions
// [0, pos0 + i], or with a sliding window (`window` > 0) the last `window` of them (then the
// cache may be a ring of `ring` rows, position j at row j % ring); its head h
// reads kv head h / group. Scores are scaled by `scale` (1/sqrt(head_dim) for Llama),
// kept in a scratch buffer [t, n_heads, ctx], soft-maxed with the row maximum subtracted, and
// the output is sum_j (e_j / total) * v_j in position order (the CPU engine's order).
// Decode is the t = 1 case.

const WG: u32 = 64u;

struct Params {
    n_heads: u32,
    group: u32,
    head_dim: u32,
    q_stride: u32,
    kv_stride: u32,
    out_stride: u32,
    ctx: u32,
    scale: f32,
    window: u32,
    ring: u32,
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
@group(0) @binding(2) var<storage, read> q: array<f32>;
@group(0) @binding(3) var<storage, read> kc: array<f32>;
@group(0) @binding(4) var<storage, read> vc: array<f32>;
@group(0) @binding(5) var<storage, read_write> scores: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;

var<workgroup> red: array<f32, WG>;

// The cache row of position j: j, or j % ring in a ring-buffer cache (a sliding-window
// layer's, which holds only the positions its queries can still see).
fn cache_row(j: u32) -> u32 {
    if p.ring > 0u {
        return j % p.ring;
    }
    return j;
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let h = wid.x;
    let i = wid.y;
    let n = step.pos0 + i + 1u;
    var start = 0u;
    if p.window > 0u && n > p.window {
        start = n - p.window;
    }
    let qb = i * p.q_stride + h * p.head_dim;
    let kvo = (h / p.group) * p.head_dim;
    let sb = (i * p.n_heads + h) * p.ctx;

    var m = bitcast<f32>(0xff800000u);
    for (var j = start + lid.x; j < n; j += WG) {
        let kb = cache_row(j) * p.kv_stride + kvo;
        var s = 0.0;
        for (var d = 0u; d < p.head_dim; d++) {
            s += q[qb + d] * kc[kb + d];
        }
        s *= p.scale;
        scores[sb + j] = s;
        m = max(m, s);
    }
    red[lid.x] = m;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if lid.x < k {
            red[lid.x] = max(red[lid.x], red[lid.x + k]);
        }
        workgroupBarrier();
    }
    let mx = red[0];
    workgroupBarrier();

    var sum = 0.0;
    for (var j = start + lid.x; j < n; j += WG) {
        let e = exp(scores[sb + j] - mx);
        scores[sb + j] = e;
        sum += e;
    }
    red[lid.x] = sum;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if lid.x < k {
            red[lid.x] += red[lid.x + k];
        }
        workgroupBarrier();
    }
    let total = red[0];
    storageBarrier();
    workgroupBarrier();

    for (var d = lid.x; d < p.head_dim; d += WG) {
        var o = 0.0;
        for (var j = start; j < n; j++) {
            o += scores[sb + j] / total * vc[cache_row(j) * p.kv_stride + kvo + d];
        }
        out[i * p.out_stride + h * p.head_dim + d] = o;
    }
}
