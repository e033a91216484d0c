// Rotary embeddings ("rotate_half") for tokens at positions pos0 + i, fused with the KV-cache
// append. qkv holds each token's q, k and v projections in one row of q_stride floats (q at 0,
// k at k_offset, v at v_offset): q is rotated in place; k is rotated into the key cache at row
// pos0 + i, and v is copied unchanged into the value cache at the same row (both caches are
// [ctx, kv_stride]), so no copy command splits the step's compute pass.
// Pairs (i, i + half): x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin.
// cos/sin come from a table computed on the CPU exactly as the CPU engine computes them
// (cos at [pos * half + i], sin at [sin_offset + pos * half + i]), so angles match bitwise.

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
@group(0) @binding(2) var<storage, read_write> qkv: array<f32>;
@group(0) @binding(3) var<storage, read> table: array<f32>;
@group(0) @binding(4) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(5) var<storage, read_write> v_cache: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x % p.half;
    let head = gid.x / p.half;
    let tok = gid.y;
    if head >= p.n_heads + p.n_kv_heads || tok >= step.t {
        return;
    }
    let ti = (step.pos0 + tok) * p.half + i;
    let c = table[ti];
    let s = table[p.sin_offset + ti];
    if head < p.n_heads {
        let b = tok * p.q_stride + head * p.head_dim + i;
        let x1 = qkv[b];
        let x2 = qkv[b + p.half];
        qkv[b] = x1 * c - x2 * s;
        qkv[b + p.half] = x2 * c + x1 * s;
    } else {
        let col = (head - p.n_heads) * p.head_dim + i;
        let kb = tok * p.q_stride + p.k_offset + col;
        let vb = tok * p.q_stride + p.v_offset + col;
        let dst = (step.pos0 + tok) * p.kv_stride + col;
        let x1 = qkv[kb];
        let x2 = qkv[kb + p.half];
        k_cache[dst] = x1 * c - x2 * s;
        k_cache[dst + p.half] = x2 * c + x1 * s;
        v_cache[dst] = qkv[vb];
        v_cache[dst + p.half] = qkv[vb + p.half];
    }
}
