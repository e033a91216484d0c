// Prefill matrix products over t tokens (rows of x and out). A workgroup computes a TT x TN
// tile (16 tokens x 64 outputs); two entry points with the same grid and results:
// - gemm: tiled with shared memory, K in steps of TK (GPUs);
// - gemm_rows: no shared memory or barriers, each thread a 4 x 4 block of outputs (4 rows
//   of W x 4 tokens; transposed: 1 column unit of 8 outputs x 2 tokens) read straight from
//   storage, so each weight load serves 4 tokens and each activation load 4 rows (CPU
//   adapters such as lavapipe, where every storage or shared-memory load is a per-lane
//   scalar loop and barriers switch coroutines; threads whose tokens are all past t skip
//   the loop, so a short prompt costs about its number of GEMVs).
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

// x tile [TK][TT] with 4 tokens per vec4 (xt[kk * TT / 4 + i / 4][i % 4] is token t0 + i at
// k0 + kk), so the inner loop reads the 16 tokens' activations in 4 loads (on CPU adapters
// every shared-memory load is a per-lane loop, and those loads bound the speed), and the
// weight tile [TK][TN].
var<workgroup> xt: array<vec4<f32>, 128>;
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
    // Tokens 0-3, 4-7, 8-11 and 12-15 of the tile.
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < p.k; k0 += TK) {
        for (var e = lid.x; e < TT * TK; e += WG) {
            let i = e / TK;
            let kk = e % TK;
            let t = t0 + i;
            let k = k0 + kk;
            var v = 0.0;
            if t < step.t && k < p.k {
                v = x[t * p.x_stride + p.k_offset + k];
            }
            xt[kk * (TT / 4u) + i / 4u][i % 4u] = v;
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
            let xb = kk * (TT / 4u);
            acc0 += xt[xb] * wv;
            acc1 += xt[xb + 1u] * wv;
            acc2 += xt[xb + 2u] * wv;
            acc3 += xt[xb + 3u] * wv;
        }
        workgroupBarrier();
    }
    let col = n0 + lid.x;
    if col < p.n {
        let acc = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
        for (var i = 0u; i < TT; i++) {
            let t = t0 + i;
            if t < step.t {
                let o = t * p.out_stride + p.out_offset + col;
                let v = acc[i / 4u][i % 4u];
                if ACCUMULATE {
                    out[o] = out[o] + v;
                } else {
                    out[o] = v;
                }
            }
        }
    }
}

fn store_out(o: u32, v: f32) {
    if ACCUMULATE {
        out[o] = out[o] + v;
    } else {
        out[o] = v;
    }
}

fn x_unit(t: u32, u: u32) -> Unit {
    let b = t * p.x_stride + p.k_offset + 8u * u;
    return Unit(vec4<f32>(x[b], x[b + 1u], x[b + 2u], x[b + 3u]), vec4<f32>(x[b + 4u], x[b + 5u], x[b + 6u], x[b + 7u]));
}

fn dot8(a: Unit, b: Unit) -> f32 {
    return dot(a.lo, b.lo) + dot(a.hi, b.hi);
}

@compute @workgroup_size(WG)
fn gemm_rows(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    if TRANSPOSED {
        // Column unit cu (8 outputs) of the tile's 8, tokens 2 * tg and 2 * tg + 1 of its 16.
        let cu = wid.x * (TN / 8u) + lid.x % (TN / 8u);
        let ta = wid.y * TT + 2u * (lid.x / (TN / 8u));
        let tb = ta + 1u;
        if cu >= p.row_units || ta >= step.t {
            return;
        }
        let two = tb < step.t;
        var a = Unit(vec4<f32>(0.0), vec4<f32>(0.0));
        var b = Unit(vec4<f32>(0.0), vec4<f32>(0.0));
        for (var r = 0u; r < p.k; r++) {
            let wu = unit(r * p.row_units + cu);
            let xa = x[ta * p.x_stride + p.k_offset + r];
            a.lo += xa * wu.lo;
            a.hi += xa * wu.hi;
            if two {
                let xb = x[tb * p.x_stride + p.k_offset + r];
                b.lo += xb * wu.lo;
                b.hi += xb * wu.hi;
            }
        }
        for (var j = 0u; j < 8u; j++) {
            let c = cu * 8u + j;
            if c < p.n {
                let va = select(a.hi[j % 4u], a.lo[j % 4u], j < 4u);
                store_out(ta * p.out_stride + p.out_offset + c, va);
                if two {
                    let vb = select(b.hi[j % 4u], b.lo[j % 4u], j < 4u);
                    store_out(tb * p.out_stride + p.out_offset + c, vb);
                }
            }
        }
        return;
    }
    // Rows 4 * rg .. + 3 of the tile's 64, tokens 4 * tg .. + 3 of its 16.
    let row0 = wid.x * TN + 4u * (lid.x % (TN / 4u));
    let tok0 = wid.y * TT + 4u * (lid.x / (TN / 4u));
    if row0 >= p.n || tok0 >= step.t {
        return;
    }
    let nt = min(step.t - tok0, 4u);
    let last = p.n - 1u;
    var acc: array<vec4<f32>, 4>;
    for (var u = 0u; u < p.row_units; u++) {
        let w0 = unit(min(row0, last) * p.row_units + u);
        let w1 = unit(min(row0 + 1u, last) * p.row_units + u);
        let w2 = unit(min(row0 + 2u, last) * p.row_units + u);
        let w3 = unit(min(row0 + 3u, last) * p.row_units + u);
        for (var i = 0u; i < nt; i++) {
            let xv = x_unit(tok0 + i, u);
            acc[i] += vec4<f32>(dot8(w0, xv), dot8(w1, xv), dot8(w2, xv), dot8(w3, xv));
        }
    }
    for (var i = 0u; i < nt; i++) {
        for (var j = 0u; j < 4u; j++) {
            if row0 + j < p.n {
                store_out((tok0 + i) * p.out_stride + p.out_offset + row0 + j, acc[i][j]);
            }
        }
    }
}
