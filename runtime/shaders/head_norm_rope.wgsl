// Gemma 3n's per-head norms and rotary embedding, fused with the KV-cache append: one
// workgroup per (head slot, token). Slots 0..n_heads are query heads (RMS-normalised with
// norms[0..head_dim], rotated, written back in place); on a layer that owns its K/V
// (`n_kv_heads` > 0) the next n_kv_heads slots are key heads (normalised with
// norms[head_dim..2 head_dim], rotated into the key cache at row pos0 + i, or (pos0 + i) % ring
// in a sliding-window layer's ring-buffer cache) and the last
// n_kv_heads are value heads (normalised without a weight into the value cache).
// Rotation as rope.wgsl (rotate_half; the cos/sin table of the layer's RoPE base, cos at
// [pos * half + i], sin at [sin_offset + pos * half + i]).

const WG: u32 = 64u;
const MAX_HEAD_DIM: u32 = 512u;

struct Params {
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    half: u32,
    q_stride: u32,
    kv_stride: u32,
    sin_offset: u32,
    k_offset: u32,
    v_offset: u32,
    eps: f32,
    ring: u32,
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
@group(0) @binding(2) var<storage, read_write> qkv: array<f32>;
@group(0) @binding(3) var<storage, read> table: array<f32>;
@group(0) @binding(4) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(5) var<storage, read_write> v_cache: array<f32>;
@group(0) @binding(6) var<storage, read> norms: array<f32>;

var<workgroup> red: array<f32, WG>;
var<workgroup> y: array<f32, MAX_HEAD_DIM>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let lid = lid3.x;
    let slot = wid.x;
    let tok = wid.y;
    let hd = p.head_dim;
    // Source offset in the qkv row and which norm applies.
    var src = tok * p.q_stride + slot * hd;
    var kind = 0u;
    if slot >= p.n_heads + p.n_kv_heads {
        kind = 2u;
        src = tok * p.q_stride + p.v_offset + (slot - p.n_heads - p.n_kv_heads) * hd;
    } else if slot >= p.n_heads {
        kind = 1u;
        src = tok * p.q_stride + p.k_offset + (slot - p.n_heads) * hd;
    }
    var s = 0.0;
    for (var c = lid; c < hd; c += WG) {
        let v = qkv[src + c];
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
    let r = 1.0 / sqrt(red[0] / f32(hd) + p.eps);
    for (var c = lid; c < hd; c += WG) {
        var wv = 1.0;
        if kind == 0u {
            wv = norms[c];
        } else if kind == 1u {
            wv = norms[hd + c];
        }
        y[c] = qkv[src + c] * r * wv;
    }
    workgroupBarrier();
    // A sliding-window layer's cache is a ring of `ring` rows (position j at row j % ring).
    var cache_pos = step.pos0 + tok;
    if p.ring > 0u {
        cache_pos = cache_pos % p.ring;
    }
    let row = cache_pos * p.kv_stride;
    if kind == 2u {
        let dst = row + (slot - p.n_heads - p.n_kv_heads) * hd;
        for (var c = lid; c < hd; c += WG) {
            v_cache[dst + c] = y[c];
        }
        return;
    }
    for (var i = lid; i < p.half; i += WG) {
        let ti = (step.pos0 + tok) * p.half + i;
        let cs = table[ti];
        let sn = table[p.sin_offset + ti];
        let x1 = y[i];
        let x2 = y[i + p.half];
        let a = x1 * cs - x2 * sn;
        let b = x2 * cs + x1 * sn;
        if kind == 0u {
            qkv[src + i] = a;
            qkv[src + i + p.half] = b;
        } else {
            let dst = row + (slot - p.n_heads) * hd;
            k_cache[dst + i] = a;
            k_cache[dst + i + p.half] = b;
        }
    }
}
