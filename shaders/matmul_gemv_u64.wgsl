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
    _pad: u32,
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
