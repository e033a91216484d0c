// Decode matrix-vector products (one token, row 0 of x and out).
//
// Weights: a chunk of a row-major matrix, every row padded with zeros to a multiple of 8
// elements ("units"); a unit is one vec4<u32> of 8 packed f16 (low half first), or two
// vec4<u32> of 4 f32 each when F32_WEIGHTS. Arithmetic is f32.
//
// gemv:   out[out_offset + r] = sum_c W[r, c] * x[c]          (r < n, c < k; Linear [out, in])
//         ROWS row groups per workgroup (an override: a power of two dividing WG), the K
//         dimension split across WG / ROWS threads per group, shared-memory tree reduction;
//         each thread computes RPT adjacent rows (an override: 1, 2 or 4), so a workgroup
//         covers ROWS * RPT rows and every x load serves RPT rows. ROWS = WG, RPT = 4 (one
//         thread per 4 rows, no reduction) suits CPU adapters (lavapipe, where every storage
//         load is a per-lane scalar loop, so loads per row-unit bound the speed); few rows per
//         workgroup with many threads each (RPT = 1) gives coalesced loads on GPUs.
// gemv_t: out[c] = sum_r x[k_offset + r] * W[r, c]             (r < k, c < n; ffn_down_t)
//         CU column units per workgroup, the K dimension split across WG / CU threads (GPUs).
// gemv_t_split + gemv_t_reduce: the same product on CPU adapters, in two dispatches. Split:
//         workgroup (s, b) sums rows [s * per, (s + 1) * per) of the SLABS = num_workgroups.x
//         slabs (per = ceil(k / slabs)) for the column units [256 b, 256 b + 256); each thread
//         owns 4 adjacent column units (64 contiguous bytes of f16 per row, so the 8 lanes a
//         CPU adapter runs together read 512 contiguous bytes of every row, and the slab split
//         gives every core work) and writes its 4 partial units to partials[s][unit]. Reduce:
//         out[c] (+)= sum over the p.slabs slabs of partials[s][c / 8], slabs in order, one
//         thread per column unit. Measured on lavapipe (8192 x 2048 f16, 16 distinct weights):
//         4-5x the old one-pass kernel, whose per-thread column slices strided 4 KiB rows.
// ACCUMULATE adds into out instead of overwriting (residual connection fused in).

override F32_WEIGHTS: bool = false;
override ACCUMULATE: bool = false;

const WG: u32 = 64u;
override ROWS: u32 = 4u;
override RPT: u32 = 1u;
const CU: u32 = 16u;
const KSPLIT: u32 = WG / CU;

struct Params {
    // Output features written by this dispatch (rows of the chunk for gemv, real columns for gemv_t).
    n: u32,
    // Reduction length (real columns for gemv, rows of the chunk for gemv_t).
    k: u32,
    // 8-element units per padded weight row.
    row_units: u32,
    x_stride: u32,
    out_stride: u32,
    out_offset: u32,
    k_offset: u32,
    // K slabs of gemv_t_split whose partials gemv_t_reduce sums.
    slabs: u32,
}

struct Step {
    pos0: u32,
    t: u32,
    _pad0: u32,
    _pad1: u32,
}

struct Unit {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
// Partial sums of gemv_t_split: [slab][column unit] as (lo, hi) vec4 pairs.
@group(0) @binding(5) var<storage, read_write> partials: array<vec4<f32>>;

var<workgroup> red: array<f32, WG>;
var<workgroup> red_lo: array<vec4<f32>, WG>;
var<workgroup> red_hi: array<vec4<f32>, WG>;

fn unit(u: u32) -> Unit {
    if F32_WEIGHTS {
        return Unit(bitcast<vec4<f32>>(w[2u * u]), bitcast<vec4<f32>>(w[2u * u + 1u]));
    }
    let q = w[u];
    return Unit(
        vec4<f32>(unpack2x16float(q.x), unpack2x16float(q.y)),
        vec4<f32>(unpack2x16float(q.z), unpack2x16float(q.w)),
    );
}

fn x_at(i: u32) -> f32 {
    return x[i / 4u][i % 4u];
}

fn store(o: u32, v: f32) {
    if ACCUMULATE {
        out[o] = out[o] + v;
    } else {
        out[o] = v;
    }
}

fn dot_unit(u: u32, lo: vec4<f32>, hi: vec4<f32>) -> vec4<f32> {
    let wu = unit(u);
    return wu.lo * lo + wu.hi * hi;
}

// Sums the RPT-row partial `a` of every thread of a row group and stores it for `row`.
fn reduce_store(lid: u32, lane: u32, tpr: u32, row: u32, a: vec4<f32>) {
    let v = (a.x + a.y) + (a.z + a.w);
    if tpr == 1u {
        if row < p.n {
            store(p.out_offset + row, v);
        }
        return;
    }
    red[lid] = v;
    workgroupBarrier();
    for (var s = tpr / 2u; s > 0u; s >>= 1u) {
        if lane < s {
            red[lid] += red[lid + s];
        }
        workgroupBarrier();
    }
    if lane == 0u && row < p.n {
        store(p.out_offset + row, red[lid]);
    }
    workgroupBarrier();
}

@compute @workgroup_size(WG)
fn gemv(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let tpr = WG / ROWS;
    let lane = lid.x % tpr;
    let row0 = ((wid.x + wid.y * nwg.x) * ROWS + lid.x / tpr) * RPT;
    // Rows past the end read the last row (in bounds) and are not stored.
    let last = p.n - 1u;
    let b0 = min(row0, last) * p.row_units;
    let b1 = min(row0 + 1u, last) * p.row_units;
    let b2 = min(row0 + 2u, last) * p.row_units;
    let b3 = min(row0 + 3u, last) * p.row_units;
    var a0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0);
    var a3 = vec4<f32>(0.0);
    for (var u = lane; u < p.row_units; u += tpr) {
        let lo = x[2u * u];
        let hi = x[2u * u + 1u];
        a0 += dot_unit(b0 + u, lo, hi);
        if RPT > 1u {
            a1 += dot_unit(b1 + u, lo, hi);
        }
        if RPT > 2u {
            a2 += dot_unit(b2 + u, lo, hi);
            a3 += dot_unit(b3 + u, lo, hi);
        }
    }
    reduce_store(lid.x, lane, tpr, row0, a0);
    if RPT > 1u {
        reduce_store(lid.x, lane, tpr, row0 + 1u, a1);
    }
    if RPT > 2u {
        reduce_store(lid.x, lane, tpr, row0 + 2u, a2);
        reduce_store(lid.x, lane, tpr, row0 + 3u, a3);
    }
}

@compute @workgroup_size(WG)
fn gemv_t(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let cl = lid.x % CU;
    let split = lid.x / CU;
    let cu = wid.x * CU + cl;
    var lo = vec4<f32>(0.0);
    var hi = vec4<f32>(0.0);
    if cu < p.row_units {
        for (var r = split; r < p.k; r += KSPLIT) {
            let h = x_at(p.k_offset + r);
            let wu = unit(r * p.row_units + cu);
            lo += h * wu.lo;
            hi += h * wu.hi;
        }
    }
    red_lo[lid.x] = lo;
    red_hi[lid.x] = hi;
    workgroupBarrier();
    if split == 0u && cu < p.row_units {
        for (var s = 1u; s < KSPLIT; s++) {
            lo += red_lo[lid.x + s * CU];
            hi += red_hi[lid.x + s * CU];
        }
        let c0 = cu * 8u;
        for (var j = 0u; j < 4u; j++) {
            if c0 + j < p.n {
                store(p.out_offset + c0 + j, lo[j]);
            }
            if c0 + 4u + j < p.n {
                store(p.out_offset + c0 + 4u + j, hi[j]);
            }
        }
    }
}

// Stores the 8 outputs of column unit cu (those below n).
fn store_unit(cu: u32, lo: vec4<f32>, hi: vec4<f32>) {
    let c0 = cu * 8u;
    for (var j = 0u; j < 4u; j++) {
        if c0 + j < p.n {
            store(p.out_offset + c0 + j, lo[j]);
        }
        if c0 + 4u + j < p.n {
            store(p.out_offset + c0 + 4u + j, hi[j]);
        }
    }
}

// Column units per workgroup of gemv_t_split: 4 per thread.
const SPLIT_UNITS: u32 = 4u * WG;

@compute @workgroup_size(WG)
fn gemv_t_split(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let per = (p.k + nwg.x - 1u) / nwg.x;
    let r0 = wid.x * per;
    let r1 = min(r0 + per, p.k);
    let u0 = wid.y * SPLIT_UNITS + 4u * lid.x;
    // Units past the end read the last unit (in bounds) and are not stored.
    let last = p.row_units - 1u;
    let c0 = min(u0, last);
    let c1 = min(u0 + 1u, last);
    let c2 = min(u0 + 2u, last);
    let c3 = min(u0 + 3u, last);
    var a0 = Unit(vec4<f32>(0.0), vec4<f32>(0.0));
    var a1 = a0;
    var a2 = a0;
    var a3 = a0;
    for (var r = r0; r < r1; r++) {
        let h = x_at(p.k_offset + r);
        let b = r * p.row_units;
        let w0 = unit(b + c0);
        let w1 = unit(b + c1);
        let w2 = unit(b + c2);
        let w3 = unit(b + c3);
        a0.lo += h * w0.lo;
        a0.hi += h * w0.hi;
        a1.lo += h * w1.lo;
        a1.hi += h * w1.hi;
        a2.lo += h * w2.lo;
        a2.hi += h * w2.hi;
        a3.lo += h * w3.lo;
        a3.hi += h * w3.hi;
    }
    let o = 2u * (wid.x * p.row_units + u0);
    if u0 < p.row_units {
        partials[o] = a0.lo;
        partials[o + 1u] = a0.hi;
    }
    if u0 + 1u < p.row_units {
        partials[o + 2u] = a1.lo;
        partials[o + 3u] = a1.hi;
    }
    if u0 + 2u < p.row_units {
        partials[o + 4u] = a2.lo;
        partials[o + 5u] = a2.hi;
    }
    if u0 + 3u < p.row_units {
        partials[o + 6u] = a3.lo;
        partials[o + 7u] = a3.hi;
    }
}

@compute @workgroup_size(WG)
fn gemv_t_reduce(@builtin(global_invocation_id) gid: vec3<u32>) {
    let cu = gid.x;
    if cu >= p.row_units {
        return;
    }
    var lo = vec4<f32>(0.0);
    var hi = vec4<f32>(0.0);
    for (var s = 0u; s < p.slabs; s++) {
        let o = 2u * (s * p.row_units + cu);
        lo += partials[o];
        hi += partials[o + 1u];
    }
    store_unit(cu, lo, hi);
}
