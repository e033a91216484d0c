// Decode matrix-vector product for CPU adapters with 8-invocation subgroups (lavapipe), on the
// packed64 path: matmul_gemv_u64.wgsl's gemv_pairs (same grid, same rows per invocation, the
// same f32 operations in the same order, so the same results bit for bit) with each pair's
// activations loaded once per subgroup instead of once per invocation.
//
// Why: lavapipe runs a storage load whose address is not provably uniform (a loop counter's is
// not) as a loop over the invocations of scalar loads. gemv_pairs loads 64 bytes of x per pair
// of weight units in every invocation, as many load components as the 4 rows' weights it
// reads per pair. Here invocation i of a subgroup loads one u64 (activations 2i and 2i + 1 of
// the pair's 16) and subgroupBroadcast hands all 16 to every invocation: 8 load components per
// subgroup instead of 64.
//
// Needs SHADER_INT64 and SUBGROUP with a subgroup size of exactly 8 (the engine picks it only
// then). Every invocation runs the same loop (rows past the end read the last row and are not
// stored), so all 8 invocations of a subgroup are active at each broadcast.
//
// gemv_pairs: out[out_offset + r] = sum_c W[r, c] * x[c] (r < n, c < k), RPT adjacent rows per
//       invocation, WG invocations per workgroup, an even number of 8-element units per row.
// ACCUMULATE adds into out instead of overwriting (residual connection fused in).

override ACCUMULATE: bool = false;

const WG: u32 = 64u;
// Row groups per workgroup: always WG here (one invocation per row group); declared so that
// the pipeline keys of every decode GEMV carry the same constants.
override ROWS: u32 = 64u;
override RPT: u32 = 1u;

struct Params {
    n: u32,
    k: u32,
    // 8-element units per padded weight row.
    row_units: u32,
    x_stride: u32,
    out_stride: u32,
    out_offset: u32,
    k_offset: u32,
    slabs: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// Row 0 of the activations, two f32 per u64 (low half first).
@group(0) @binding(2) var<storage, read> x: array<u64>;
// Weight rows, two 8-element f16 units per vec4<u64>.
@group(0) @binding(3) var<storage, read> w2: array<vec4<u64>>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

fn f16x4(v: u64) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(u32(v & 0xfffffffflu)), unpack2x16float(u32(v >> 32u)));
}

fn dot_unit2(q: vec2<u64>, lo: vec4<f32>, hi: vec4<f32>) -> vec4<f32> {
    return f16x4(q.x) * lo + f16x4(q.y) * hi;
}

fn f32x4(a: vec2<u32>, b: vec2<u32>) -> vec4<f32> {
    return bitcast<vec4<f32>>(vec4<u32>(a, b));
}

fn store(row: u32, a: vec4<f32>) {
    if row < p.n {
        let o = p.out_offset + row;
        let v = (a.x + a.y) + (a.z + a.w);
        if ACCUMULATE {
            out[o] = out[o] + v;
        } else {
            out[o] = v;
        }
    }
}

@compute @workgroup_size(WG)
fn gemv_pairs(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(subgroup_invocation_id) sl: u32,
) {
    let row0 = ((wid.x + wid.y * nwg.x) * WG + lid.x) * RPT;
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
        let mine = x[8u * v + sl];
        let m = vec2<u32>(u32(mine & 0xfffffffflu), u32(mine >> 32u));
        let xa_lo = f32x4(subgroupBroadcast(m, 0u), subgroupBroadcast(m, 1u));
        let xa_hi = f32x4(subgroupBroadcast(m, 2u), subgroupBroadcast(m, 3u));
        let xb_lo = f32x4(subgroupBroadcast(m, 4u), subgroupBroadcast(m, 5u));
        let xb_hi = f32x4(subgroupBroadcast(m, 6u), subgroupBroadcast(m, 7u));
        let q0 = w2[h0 + v];
        a0 += dot_unit2(q0.xy, xa_lo, xa_hi);
        a0 += dot_unit2(q0.zw, xb_lo, xb_hi);
        if RPT > 1u {
            let q1 = w2[h1 + v];
            a1 += dot_unit2(q1.xy, xa_lo, xa_hi);
            a1 += dot_unit2(q1.zw, xb_lo, xb_hi);
        }
        if RPT > 2u {
            let q2 = w2[h2 + v];
            let q3 = w2[h3 + v];
            a2 += dot_unit2(q2.xy, xa_lo, xa_hi);
            a2 += dot_unit2(q2.zw, xb_lo, xb_hi);
            a3 += dot_unit2(q3.xy, xa_lo, xa_hi);
            a3 += dot_unit2(q3.zw, xb_lo, xb_hi);
        }
    }
    store(row0, a0);
    if RPT > 1u {
        store(row0 + 1u, a1);
    }
    if RPT > 2u {
        store(row0 + 2u, a2);
        store(row0 + 3u, a3);
    }
}
