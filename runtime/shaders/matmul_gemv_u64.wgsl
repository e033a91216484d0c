// Decode matrix-vector product on the packed64 path (adapters with SHADER_INT64): the packed
// path's `gemv` (matmul_gemv.wgsl: same weights, grid, results and f32 arithmetic) with every
// storage load 64 bits wide. A weight unit of 8 f16 is one vec2<u64> (four f16 per u64, low
// half first) and an activation unit of 8 f32 one vec4<u64>, so a unit costs 2 + 4 load
// components instead of 4 + 8: on CPU adapters (lavapipe) each storage load is a per-lane loop
// of scalar loads, and this halves it. The f16 values are unpacked with `unpack2x16float` and
// the activations bit-cast back to f32, so the results equal the packed path's bit for bit
// (same operations in the same order).
//
// gemv: out[out_offset + r] = sum_c W[r, c] * x[c]   (r < n, c < k; Linear [out, in])
//       ROWS row groups per workgroup (a power of two dividing WG), the K dimension split
//       across WG / ROWS threads per group with a shared-memory tree reduction; RPT adjacent
//       rows per thread (1, 2 or 4). x is row 0 of the activations (rows padded to 8 floats,
//       so unit u of row 0 is 32-byte aligned).
// gemv_pairs: gemv with one thread per row group (ROWS = WG, the CPU-adapter shape) for an
//       even number of units per row (rows start 32-byte aligned): each weight load is a
//       vec4<u64> of two units, halving the load instructions again (measured ~1.2x on
//       lavapipe); the two units are added to the row's sum one after the other, so the
//       results equal gemv's (and the packed path's) bit for bit. Same grid as gemv.
// gemv_t_split: the split pass of the transposed product of the CPU adapters for an even
//       number of units per row (matmul_gemv.wgsl: same slabs, grid, partials and f32
//       operations in the same order, so the same results), each thread's 4 column units read
//       as two vec4<u64> loads; matmul_gemv.wgsl's gemv_t_reduce (which reads only the
//       partials) finishes it.
// ACCUMULATE adds into out instead of overwriting (residual connection fused in).

override ACCUMULATE: bool = false;

const WG: u32 = 64u;
override ROWS: u32 = 4u;
override RPT: u32 = 1u;

struct Params {
    // Output features written by this dispatch (rows of the chunk).
    n: u32,
    // Reduction length (real columns).
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
@group(0) @binding(2) var<storage, read> x: array<vec4<u64>>;
@group(0) @binding(3) var<storage, read> w: array<vec2<u64>>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
// Partial sums of gemv_t_split: [slab][column unit] as (lo, hi) vec4 pairs.
@group(0) @binding(5) var<storage, read_write> partials: array<vec4<f32>>;
// The same buffers as x and w, seen as f32 activations (gemv_t_split) and as pairs of units
// (vec4<u64>: the paired gemv, gemv_t_split). Each entry point uses one view of each.
@group(0) @binding(2) var<storage, read> xf: array<f32>;
@group(0) @binding(3) var<storage, read> w2: array<vec4<u64>>;

var<workgroup> red: array<f32, WG>;

fn lo32(v: u64) -> u32 {
    return u32(v & 0xfffffffflu);
}

fn hi32(v: u64) -> u32 {
    return u32(v >> 32u);
}

fn f32x2(v: u64) -> vec2<f32> {
    return vec2<f32>(bitcast<f32>(lo32(v)), bitcast<f32>(hi32(v)));
}

fn f16x4(v: u64) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(lo32(v)), unpack2x16float(hi32(v)));
}

fn x_unit(u: u32) -> Unit {
    let v = x[u];
    return Unit(vec4<f32>(f32x2(v.x), f32x2(v.y)), vec4<f32>(f32x2(v.z), f32x2(v.w)));
}

fn dot_unit(u: u32, xv: Unit) -> vec4<f32> {
    let q = w[u];
    return f16x4(q.x) * xv.lo + f16x4(q.y) * xv.hi;
}

fn dot_unit2(q: vec2<u64>, xv: Unit) -> vec4<f32> {
    return f16x4(q.x) * xv.lo + f16x4(q.y) * xv.hi;
}

fn store(o: u32, v: f32) {
    if ACCUMULATE {
        out[o] = out[o] + v;
    } else {
        out[o] = v;
    }
}

// Sums the partial `a` of every thread of a row group and stores it for `row`.
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
        let xv = x_unit(u);
        a0 += dot_unit(b0 + u, xv);
        if RPT > 1u {
            a1 += dot_unit(b1 + u, xv);
        }
        if RPT > 2u {
            a2 += dot_unit(b2 + u, xv);
            a3 += dot_unit(b3 + u, xv);
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
fn gemv_pairs(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let row0 = ((wid.x + wid.y * nwg.x) * WG + lid.x) * RPT;
    // Rows past the end read the last row (in bounds) and are not stored. Row r starts at
    // pair r * row_units / 2 (row_units is even).
    let last = p.n - 1u;
    let h = p.row_units / 2u;
    let h0 = min(row0, last) * h;
    let h1 = min(row0 + 1u, last) * h;
    let h2 = min(row0 + 2u, last) * h;
    let h3 = min(row0 + 3u, last) * h;
    var a0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0);
    var a3 = vec4<f32>(0.0);
    for (var v = 0u; v < h; v++) {
        let xa = x_unit(2u * v);
        let xb = x_unit(2u * v + 1u);
        let q0 = w2[h0 + v];
        a0 += dot_unit2(q0.xy, xa);
        a0 += dot_unit2(q0.zw, xb);
        if RPT > 1u {
            let q1 = w2[h1 + v];
            a1 += dot_unit2(q1.xy, xa);
            a1 += dot_unit2(q1.zw, xb);
        }
        if RPT > 2u {
            let q2 = w2[h2 + v];
            let q3 = w2[h3 + v];
            a2 += dot_unit2(q2.xy, xa);
            a2 += dot_unit2(q2.zw, xb);
            a3 += dot_unit2(q3.xy, xa);
            a3 += dot_unit2(q3.zw, xb);
        }
    }
    reduce_store(lid.x, 0u, 1u, row0, a0);
    if RPT > 1u {
        reduce_store(lid.x, 0u, 1u, row0 + 1u, a1);
    }
    if RPT > 2u {
        reduce_store(lid.x, 0u, 1u, row0 + 2u, a2);
        reduce_store(lid.x, 0u, 1u, row0 + 3u, a3);
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
    // Units past the end read the last pair (in bounds) and are not stored. u0 and the row
    // start are even (row_units is even), so two pair loads cover the thread's 4 units.
    let last = p.row_units / 2u - 1u;
    let pa = min(u0 / 2u, last);
    let pb = min(u0 / 2u + 1u, last);
    var a0 = Unit(vec4<f32>(0.0), vec4<f32>(0.0));
    var a1 = a0;
    var a2 = a0;
    var a3 = a0;
    for (var r = r0; r < r1; r++) {
        let h = xf[p.k_offset + r];
        let b = r * (p.row_units / 2u);
        let qa = w2[b + pa];
        let qb = w2[b + pb];
        let q0 = qa.xy;
        let q1 = qa.zw;
        let q2 = qb.xy;
        let q3 = qb.zw;
        let w0 = Unit(f16x4(q0.x), f16x4(q0.y));
        let w1 = Unit(f16x4(q1.x), f16x4(q1.y));
        let w2u = Unit(f16x4(q2.x), f16x4(q2.y));
        let w3 = Unit(f16x4(q3.x), f16x4(q3.y));
        a0.lo += h * w0.lo;
        a0.hi += h * w0.hi;
        a1.lo += h * w1.lo;
        a1.hi += h * w1.hi;
        a2.lo += h * w2u.lo;
        a2.hi += h * w2u.hi;
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
