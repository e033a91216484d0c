// Prefill matrix products over t tokens (rows of x and out), tiled with shared memory:
// a workgroup computes a TT x TN tile (tokens x outputs), K in steps of TK.
//
// TRANSPOSED = false: out[i, out_offset + r] = sum_c x[i, c] * W[r, c]   (Linear [out, in])
// TRANSPOSED = true:  out[i, c] = sum_r x[i, k_offset + r] * W[r, c]    (ffn_down_t)
// Weights as in matmul_gemv.wgsl (8-element units of packed f16, or f32 when F32_WEIGHTS).
// ACCUMULATE adds into out (residual connection fused in).

override F32_WEIGHTS: bool = false;
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

struct Unit {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

// x tile [TT][TK] and weight tile [TK][TN].
var<workgroup> xt: array<f32, 512>;
var<workgroup> wt: array<f32, 2048>;

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

@compute @workgroup_size(WG)
fn gemm(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let n0 = wid.x * TN;
    let t0 = wid.y * TT;
    var acc: array<f32, TT>;
    for (var k0 = 0u; k0 < p.k; k0 += TK) {
        for (var e = lid.x; e < TT * TK; e += WG) {
            let t = t0 + e / TK;
            let k = k0 + e % TK;
            var v = 0.0;
            if t < step.t && k < p.k {
                v = x[t * p.x_stride + p.k_offset + k];
            }
            xt[e] = v;
        }
        // 256 units per weight tile, 4 per thread.
        for (var e = lid.x; e < 256u; e += WG) {
            var wu = Unit(vec4<f32>(0.0), vec4<f32>(0.0));
            var dst = 0u;
            var step_dst = 0u;
            if TRANSPOSED {
                // Rows k0 .. k0 + TK of W, column units n0 / 8 .. + TN / 8.
                let kk = e / (TN / 8u);
                let cu = e % (TN / 8u);
                let u = n0 / 8u + cu;
                if k0 + kk < p.k && u < p.row_units {
                    wu = unit((k0 + kk) * p.row_units + u);
                }
                dst = kk * TN + cu * 8u;
                step_dst = 1u;
            } else {
                // Rows n0 .. n0 + TN of W, units k0 / 8 .. + TK / 8.
                let r = e / (TK / 8u);
                let ku = e % (TK / 8u);
                let u = k0 / 8u + ku;
                if n0 + r < p.n && u < p.row_units {
                    wu = unit((n0 + r) * p.row_units + u);
                }
                dst = ku * 8u * TN + r;
                step_dst = TN;
            }
            for (var j = 0u; j < 4u; j++) {
                wt[dst + j * step_dst] = wu.lo[j];
                wt[dst + (4u + j) * step_dst] = wu.hi[j];
            }
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            let wv = wt[kk * TN + lid.x];
            for (var i = 0u; i < TT; i++) {
                acc[i] += xt[i * TK + kk] * wv;
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
