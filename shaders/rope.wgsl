// Rotary embeddings ("rotate_half"), in place on q [t, q_stride] and k [t, kv_stride] for
// tokens at positions pos0 + i. Pairs (i, i + half): x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin.
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
    _pad: u32,
}

struct Step {
    pos0: u32,
    t: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read_write> q: array<f32>;
@group(0) @binding(3) var<storage, read_write> k: array<f32>;
@group(0) @binding(4) var<storage, read> table: array<f32>;

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
        let x1 = q[b];
        let x2 = q[b + p.half];
        q[b] = x1 * c - x2 * s;
        q[b + p.half] = x2 * c + x1 * s;
    } else {
        let b = tok * p.kv_stride + (head - p.n_heads) * p.head_dim + i;
        let x1 = k[b];
        let x2 = k[b + p.half];
        k[b] = x1 * c - x2 * s;
        k[b + p.half] = x2 * c + x1 * s;
    }
}
