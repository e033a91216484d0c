enable f16;

// Decode matrix-vector products on the native-f16 path (adapters with SHADER_F16, which in
// wgpu includes 16-bit storage): one token, row 0 of x and out.
//
// Precision, exactly: weights are stored as f16 (`array<vec4<f16>>`, a unit of 8 elements is
// two vec4<f16>, rows zero-padded to a multiple of 8). Each activation x[c] (f32 in memory) is
// rounded to f16, each product W[r, c] * x[c] is computed in f16 (one rounding), and the
// products are accumulated in f32 (vec4<f32> partial sums, then a f32 reduction). So per term
// the error is at most two f16 roundings (2^-11 relative each); sums are f32 as on the packed
// path. Outputs are f32. Same layout, dispatch grid and results layout as matmul_gemv.wgsl.
//
// gemv:   out[out_offset + r] = sum_c W[r, c] * x[c]          (r < n, c < k; Linear [out, in])
//         ROWS rows per workgroup (a power of two dividing WG), K split across WG / ROWS
//         threads per row, shared-memory tree reduction.
// gemv_t: out[c] = sum_r x[k_offset + r] * W[r, c]             (r < k, c < n; ffn_down_t)
//         CU column units per workgroup, the K dimension split across WG / CU threads.
// ACCUMULATE adds into out instead of overwriting (residual connection fused in).

override ACCUMULATE: bool = false;

const WG: u32 = 64u;
override ROWS: u32 = 4u;
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
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> w: array<vec4<f16>>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

var<workgroup> red: array<f32, WG>;
var<workgroup> red_lo: array<vec4<f32>, WG>;
var<workgroup> red_hi: array<vec4<f32>, WG>;

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

@compute @workgroup_size(WG)
fn gemv(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let tpr = WG / ROWS;
    let lane = lid.x % tpr;
    let row = (wid.x + wid.y * nwg.x) * ROWS + lid.x / tpr;
    var acc = vec4<f32>(0.0);
    if row < p.n {
        let base = row * p.row_units;
        for (var u = lane; u < p.row_units; u += tpr) {
            let lo = w[2u * (base + u)] * vec4<f16>(x[2u * u]);
            let hi = w[2u * (base + u) + 1u] * vec4<f16>(x[2u * u + 1u]);
            acc += vec4<f32>(lo) + vec4<f32>(hi);
        }
    }
    red[lid.x] = (acc.x + acc.y) + (acc.z + acc.w);
    workgroupBarrier();
    for (var s = tpr / 2u; s > 0u; s >>= 1u) {
        if lane < s {
            red[lid.x] += red[lid.x + s];
        }
        workgroupBarrier();
    }
    if lane == 0u && row < p.n {
        store(p.out_offset + row, red[lid.x]);
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
            let h = f16(x_at(p.k_offset + r));
            let u = r * p.row_units + cu;
            lo += vec4<f32>(h * w[2u * u]);
            hi += vec4<f32>(h * w[2u * u + 1u]);
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
