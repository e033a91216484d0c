enable f16;

// Prefill matrix products over t tokens on the native-f16 path (adapters with SHADER_F16),
// tiled with shared memory: a workgroup computes a TT x TN tile (tokens x outputs), K in steps
// of TK. Same layout, grid and results layout as matmul_gemm.wgsl.
//
// TRANSPOSED = false: out[i, out_offset + r] = sum_c x[i, c] * W[r, c]   (Linear [out, in])
// TRANSPOSED = true:  out[i, c] = sum_r x[i, k_offset + r] * W[r, c]    (ffn_down_t)
//
// Precision, exactly: weights are stored as f16 (`array<vec4<f16>>`, a unit of 8 elements is
// two vec4<f16>, rows zero-padded to a multiple of 8) and kept as f16 in the shared weight
// tile; activations (f32 in memory) are rounded to f16 in the shared x tile; each product is
// computed in f16 (one rounding) and accumulated in f32. Outputs are f32.
// ACCUMULATE adds into out (residual connection fused in).

override ACCUMULATE: bool = false;
override TRANSPOSED: bool = false;

const WG: u32 = 64u;
const TT: u32 = 16u;
const TN: u32 = 64u;
const TK: u32 = 32u;

struct Params {
    n: u32,
    k: u32,
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
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> w: array<vec4<f16>>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

// x tile [TT][TK] and weight tile [TK][TN], both f16.
var<workgroup> xt: array<f16, 512>;
var<workgroup> wt: array<f16, 2048>;

@compute @workgroup_size(WG)
fn gemm(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let n0 = wid.x * TN;
    let t0 = wid.y * TT;
    var acc: array<f32, TT>;
    for (var k0 = 0u; k0 < p.k; k0 += TK) {
        for (var e = lid.x; e < TT * TK; e += WG) {
            let t = t0 + e / TK;
            let k = k0 + e % TK;
            var v = 0.0h;
            if t < step.t && k < p.k {
                v = f16(x[t * p.x_stride + p.k_offset + k]);
            }
            xt[e] = v;
        }
        // 256 units per weight tile, 4 per thread.
        for (var e = lid.x; e < 256u; e += WG) {
            var lo = vec4<f16>(0.0h);
            var hi = vec4<f16>(0.0h);
            var dst = 0u;
            var step_dst = 0u;
            if TRANSPOSED {
                // Rows k0 .. k0 + TK of W, column units n0 / 8 .. + TN / 8.
                let kk = e / (TN / 8u);
                let cu = e % (TN / 8u);
                let u = n0 / 8u + cu;
                if k0 + kk < p.k && u < p.row_units {
                    let i = (k0 + kk) * p.row_units + u;
                    lo = w[2u * i];
                    hi = w[2u * i + 1u];
                }
                dst = kk * TN + cu * 8u;
                step_dst = 1u;
            } else {
                // Rows n0 .. n0 + TN of W, units k0 / 8 .. + TK / 8.
                let r = e / (TK / 8u);
                let ku = e % (TK / 8u);
                let u = k0 / 8u + ku;
                if n0 + r < p.n && u < p.row_units {
                    let i = (n0 + r) * p.row_units + u;
                    lo = w[2u * i];
                    hi = w[2u * i + 1u];
                }
                dst = ku * 8u * TN + r;
                step_dst = TN;
            }
            for (var j = 0u; j < 4u; j++) {
                wt[dst + j * step_dst] = lo[j];
                wt[dst + (4u + j) * step_dst] = hi[j];
            }
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            let wv = wt[kk * TN + lid.x];
            for (var i = 0u; i < TT; i++) {
                acc[i] += f32(xt[i * TK + kk] * wv);
            }
        }
        workgroupBarrier();
    }
    let col = n0 + lid.x;
    if col < p.n {
        for (var i = 0u; i < TT; i++) {
            let t = t0 + i;
            if t < step.t {
                let o = t * p.out_stride + p.out_offset + col;
                if ACCUMULATE {
                    out[o] = out[o] + acc[i];
                } else {
                    out[o] = acc[i];
                }
            }
        }
    }
}
