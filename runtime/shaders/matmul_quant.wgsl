// Matrix products with block-quantised weights (q8_0, q4_0, q4_1), with the CPU engine's
// arithmetic (runtime/src/cpu/kernels/qdot.rs) so both backends compute the same function.
// Same bindings, Params and grids as matmul_gemv.wgsl / matmul_gemm.wgsl (binding 5, the split
// GEMV's partials, is unused here).
//
// gemv:   out[out_offset + r] = sum_c x[c] * W[r, c]               (one token, RPT rows a thread)
// gemm:   out[i, out_offset + r] = sum_c x[i, c] * W[r, c]         (a thread: one row, 16 tokens)
//   The activation is quantised to 8 bits per block of 32 first, exactly as the CPU does
//   (d = max|x| / 127, q = round(x / d) half away from zero, s = d * sum(q)); a weight block
//   (dw, qw) contributes (dw * d) * sum(qw * q) (an exact integer sum), plus mw * s for q4_1's
//   minimum; blocks are added in order.
// gemv_t: out[c] = sum_r x[k_offset + r] * W[r, c]                 (one token, ffn_down_t; 16
//         threads take the 4 (q8_0) or 8 (q4) output columns of one quant word, each a slice
//         of the rows)
// gemm_t: out[i, c] = sum_r x[i, k_offset + r] * W[r, c]           (a thread: one column, 16 tokens)
//   f32 activations times the exactly decoded weights (d * q, d * (n - 8), d * n + m), as the
//   CPU's down projection does (gemm_t adds the rows in order; gemv_t in 16 slices).
// ACCUMULATE adds into out (residual connection fused in).
//
// Weights: each row repacked at upload into whole u32 words (row_units words per row), the
// block scales first, then the quants (cols a multiple of 32, nb = cols / 32 blocks):
// - QTYPE 0 (q8_0): ceil(nb / 2) words of f16 d (two per word, low half first), then 8 words
//   per block holding its 32 i8 in order;
// - QTYPE 1 (q4_0): ceil(nb / 2) words of f16 d, then 4 words per block holding its 16 nibble
//   bytes as ggml stores them (byte j: element j in the low nibble, j + 16 in the high one);
//   element value d * (n - 8);
// - QTYPE 2 (q4_1): nb words of (d, m) f16 pairs, then 4 words per block as q4_0; element
//   value d * n + m.

override QTYPE: u32 = 0u;
override ACCUMULATE: bool = false;

const WG: u32 = 64u;
const TT: u32 = 16u;
const RPT: u32 = 4u;

struct Params {
    n: u32,
    k: u32,
    // u32 words per weight row.
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
@group(0) @binding(3) var<storage, read> w: array<u32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

fn x_at(i: u32) -> f32 {
    return x[i / 4u][i % 4u];
}

fn store(o: u32, v: f32) {
    if ACCUMULATE {
        out[o] += v;
    } else {
        out[o] = v;
    }
}

// Words of scales at the start of a row of `cols` elements.
fn scale_words(cols: u32) -> u32 {
    let nb = cols / 32u;
    if QTYPE == 2u {
        return nb;
    }
    return (nb + 1u) / 2u;
}

// Quant words per block.
fn block_words() -> u32 {
    if QTYPE == 0u {
        return 8u;
    }
    return 4u;
}

// (d, m) of block b of the row at word `base` (m = 0 but for q4_1).
fn scale(base: u32, b: u32) -> vec2<f32> {
    if QTYPE == 2u {
        return unpack2x16float(w[base + b]);
    }
    return vec2<f32>(unpack2x16float(w[base + b / 2u])[b & 1u], 0.0);
}

// The four i8 of a word, in byte order.
fn i8x4(word: u32) -> vec4<f32> {
    let v = bitcast<vec4<i32>>(vec4<u32>(word << 24u, word << 16u, word << 8u, word)) >> vec4<u32>(24u);
    return vec4<f32>(v);
}

// Low nibbles of the four bytes of a word, in byte order.
fn lo4(word: u32) -> vec4<f32> {
    return vec4<f32>(vec4<u32>(word, word >> 8u, word >> 16u, word >> 24u) & vec4<u32>(15u));
}

// High nibbles of the four bytes of a word, in byte order.
fn hi4(word: u32) -> vec4<f32> {
    return vec4<f32>(vec4<u32>(word >> 4u, word >> 12u, word >> 20u, word >> 28u) & vec4<u32>(15u));
}

// The four i8 of a word, in byte order, as integers.
fn i8x4i(word: u32) -> vec4<i32> {
    return bitcast<vec4<i32>>(vec4<u32>(word << 24u, word << 16u, word << 8u, word)) >> vec4<u32>(24u);
}

// Low and high nibbles of the four bytes of a word, minus `off`, as integers.
fn lo4i(word: u32, off: i32) -> vec4<i32> {
    return bitcast<vec4<i32>>(vec4<u32>(word, word >> 8u, word >> 16u, word >> 24u) & vec4<u32>(15u)) - vec4<i32>(off);
}

fn hi4i(word: u32, off: i32) -> vec4<i32> {
    return bitcast<vec4<i32>>(vec4<u32>(word >> 4u, word >> 12u, word >> 20u, word >> 28u) & vec4<u32>(15u))
        - vec4<i32>(off);
}

// v rounded to the nearest integer, halves away from zero (Rust's f32::round).
fn round_away(v: vec4<f32>) -> vec4<f32> {
    let t = trunc(v);
    return t + select(vec4<f32>(0.0), sign(v), abs(v - t) >= vec4<f32>(0.5));
}

// One activation block quantised as the CPU does: q, d and s = d * sum(q).
struct QBlock {
    q: array<vec4<i32>, 8>,
    d: f32,
    s: f32,
}

fn quantize(xv: array<vec4<f32>, 8>) -> QBlock {
    var amax = 0.0;
    for (var i = 0u; i < 8u; i++) {
        let a = abs(xv[i]);
        amax = max(amax, max(max(a.x, a.y), max(a.z, a.w)));
    }
    var qb: QBlock;
    qb.d = amax / 127.0;
    var id = 0.0;
    if qb.d > 0.0 {
        id = 1.0 / qb.d;
    }
    var sum = vec4<i32>(0);
    for (var i = 0u; i < 8u; i++) {
        qb.q[i] = vec4<i32>(round_away(xv[i] * id));
        sum += qb.q[i];
    }
    qb.s = qb.d * f32(sum.x + sum.y + sum.z + sum.w);
    return qb;
}

// Block b of the row at word `base` (s scale words) against a quantised activation block:
// (dw * d) * sum(qw * q), plus mw * s for q4_1.
fn block_qdot(base: u32, s: u32, b: u32, qb: QBlock) -> f32 {
    let dm = scale(base, b);
    let q0 = base + s + b * block_words();
    var isum = 0;
    var min_term = 0.0;
    if QTYPE == 0u {
        for (var i = 0u; i < 8u; i++) {
            isum += dot(i8x4i(w[q0 + i]), qb.q[i]);
        }
    } else {
        var off = 8;
        if QTYPE == 2u {
            off = 0;
            min_term = dm.y * qb.s;
        }
        for (var i = 0u; i < 4u; i++) {
            let word = w[q0 + i];
            isum += dot(lo4i(word, off), qb.q[i]) + dot(hi4i(word, off), qb.q[4u + i]);
        }
    }
    return dm.x * qb.d * f32(isum) + min_term;
}

// Nibbles n decoded with (d, m).
fn q4(n: vec4<f32>, dm: vec2<f32>) -> vec4<f32> {
    if QTYPE == 1u {
        return dm.x * (n - vec4<f32>(8.0));
    }
    return dm.x * n + vec4<f32>(dm.y);
}

// Decoded element e of block b of the row at word `base` (s scale words).
fn element(base: u32, s: u32, b: u32, e: u32) -> f32 {
    let dm = scale(base, b);
    let q0 = base + s + b * block_words();
    if QTYPE == 0u {
        let word = w[q0 + e / 4u];
        return dm.x * f32(bitcast<i32>(word << (24u - 8u * (e % 4u))) >> 24u);
    }
    let j = e % 16u;
    let word = w[q0 + j / 4u];
    let n = f32((word >> (8u * (j % 4u) + 4u * (e / 16u))) & 15u);
    return q4(vec4<f32>(n), dm).x;
}

// gemv: the activation's blocks quantised once per workgroup, SEG blocks at a time (one block a
// thread), into shared memory: 8 words of packed i8 per block, its d and its integer sum.
const SEG: u32 = 64u;
var<workgroup> gq: array<u32, 512>;
var<workgroup> gd: array<f32, 64>;
var<workgroup> gsum: array<i32, 64>;

// Block b of the row at word `base` (s scale words) against an activation block held as
// packed i8 words `xq`, its d `xd` and its integer sum `xs`: (dw * d) * sum(qw * q), plus
// mw * s for q4_1, with packed 4 x i8 dot products (q4: the nibbles as non-negative bytes,
// sum((n - 8) q) = sum(n q) - 8 sum(q) for q4_0; all exact).
fn block_qdot_packed(base: u32, s: u32, b: u32, xq: array<u32, 8>, xd: f32, xs: i32) -> f32 {
    let dm = scale(base, b);
    let q0 = base + s + b * block_words();
    var isum = 0;
    var min_term = 0.0;
    if QTYPE == 0u {
        for (var i = 0u; i < 8u; i++) {
            isum += dot4I8Packed(w[q0 + i], xq[i]);
        }
    } else {
        for (var i = 0u; i < 4u; i++) {
            let word = w[q0 + i];
            isum += dot4I8Packed(word & 0x0f0f0f0fu, xq[i]) + dot4I8Packed((word >> 4u) & 0x0f0f0f0fu, xq[4u + i]);
        }
        if QTYPE == 1u {
            isum -= 8 * xs;
        } else {
            min_term = dm.y * (xd * f32(xs));
        }
    }
    return dm.x * xd * f32(isum) + min_term;
}

@compute @workgroup_size(WG)
fn gemv(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let r0 = ((wid.x + wid.y * nw.x) * WG + lid.x) * RPT;
    let s = scale_words(p.k);
    let nb = p.k / 32u;
    // Rows past n repeat the last row (computed, never stored): every thread reaches the
    // barriers.
    let last = p.n - 1u;
    var acc = vec4<f32>(0.0);
    for (var seg = 0u; seg < nb; seg += SEG) {
        workgroupBarrier();
        let qbk = seg + lid.x;
        if qbk < nb {
            var xv: array<vec4<f32>, 8>;
            for (var i = 0u; i < 8u; i++) {
                xv[i] = x[qbk * 8u + i];
            }
            let qb = quantize(xv);
            for (var i = 0u; i < 8u; i++) {
                gq[lid.x * 8u + i] = pack4xI8(qb.q[i]);
            }
            gd[lid.x] = qb.d;
            let sq = qb.q[0] + qb.q[1] + qb.q[2] + qb.q[3] + qb.q[4] + qb.q[5] + qb.q[6] + qb.q[7];
            gsum[lid.x] = sq.x + sq.y + sq.z + sq.w;
        }
        workgroupBarrier();
        let end = min(SEG, nb - seg);
        for (var j = 0u; j < end; j++) {
            // The block's quantised activation in registers, shared by the thread's rows.
            var xq: array<u32, 8>;
            for (var i = 0u; i < 8u; i++) {
                xq[i] = gq[j * 8u + i];
            }
            let xd = gd[j];
            let xs = gsum[j];
            for (var r = 0u; r < RPT; r++) {
                acc[r] += block_qdot_packed(min(r0 + r, last) * p.row_units, s, seg + j, xq, xd, xs);
            }
        }
    }
    for (var r = 0u; r < RPT; r++) {
        if r0 + r < p.n {
            store(p.out_offset + r0 + r, acc[r]);
        }
    }
}

// gemv_t: column groups (one quant word's columns) per workgroup, and K slices per group (WG
// threads: GT groups x KS slices; slice j sums rows j, j + KS, ...; the slices' sums are added
// in slice order through shared memory).
const GT: u32 = 4u;
const KS: u32 = 16u;
var<workgroup> red: array<vec4<f32>, 128>;

@compute @workgroup_size(WG)
fn gemv_t(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let gl = lid.x % GT;
    let slice = lid.x / GT;
    let g = (wid.x + wid.y * nw.x) * GT + gl;
    let bw = block_words();
    let b = g / bw;
    // Threads past the last block read block 0 (in bounds) and store nothing: every thread
    // reaches the barrier.
    let valid = b < p.n / 32u;
    let bb = select(0u, b, valid);
    let wi = g % bw;
    let s = scale_words(p.n);
    var lo = vec4<f32>(0.0);
    var hi = vec4<f32>(0.0);
    for (var i = slice; i < p.k; i += KS) {
        let xi = x_at(p.k_offset + i);
        let base = i * p.row_units;
        let dm = scale(base, bb);
        let word = w[base + s + bb * bw + wi];
        if QTYPE == 0u {
            lo += xi * (dm.x * i8x4(word));
        } else {
            lo += xi * q4(lo4(word), dm);
            hi += xi * q4(hi4(word), dm);
        }
    }
    red[2u * lid.x] = lo;
    red[2u * lid.x + 1u] = hi;
    workgroupBarrier();
    if slice != 0u || !valid {
        return;
    }
    lo = vec4<f32>(0.0);
    hi = vec4<f32>(0.0);
    for (var j = 0u; j < KS; j++) {
        lo += red[2u * (j * GT + gl)];
        hi += red[2u * (j * GT + gl) + 1u];
    }
    let c = b * 32u + wi * 4u;
    for (var j = 0u; j < 4u; j++) {
        store(p.out_offset + c + j, lo[j]);
        if QTYPE != 0u {
            store(p.out_offset + c + 16u + j, hi[j]);
        }
    }
}

// The quantised activation blocks of the tile's 16 tokens (one block of K at a time).
var<workgroup> xq: array<QBlock, 16>;

@compute @workgroup_size(WG)
fn gemm(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let r = wid.x * WG + lid.x;
    let t0 = wid.y * TT;
    let nt = min(TT, step.t - min(t0, step.t));
    let s = scale_words(p.k);
    let nb = p.k / 32u;
    // Rows past n repeat the last row (computed, never stored): every thread reaches the
    // barriers.
    let base = min(r, p.n - 1u) * p.row_units;
    var acc: array<f32, 16>;
    for (var b = 0u; b < nb; b++) {
        if lid.x < nt {
            let xb = ((t0 + lid.x) * p.x_stride + b * 32u) / 4u;
            var xv: array<vec4<f32>, 8>;
            for (var j = 0u; j < 8u; j++) {
                xv[j] = x[xb + j];
            }
            xq[lid.x] = quantize(xv);
        }
        workgroupBarrier();
        for (var i = 0u; i < nt; i++) {
            acc[i] += block_qdot(base, s, b, xq[i]);
        }
        workgroupBarrier();
    }
    if r < p.n {
        for (var i = 0u; i < nt; i++) {
            store((t0 + i) * p.out_stride + p.out_offset + r, acc[i]);
        }
    }
}

@compute @workgroup_size(WG)
fn gemm_t(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let c = wid.x * WG + lid.x;
    let t0 = wid.y * TT;
    if c >= p.n || t0 >= step.t {
        return;
    }
    let nt = min(TT, step.t - t0);
    let s = scale_words(p.n);
    let b = c / 32u;
    let e = c % 32u;
    var acc: array<f32, 16>;
    for (var i = 0u; i < p.k; i++) {
        let wv = element(i * p.row_units, s, b, e);
        for (var j = 0u; j < nt; j++) {
            acc[j] += x_at((t0 + j) * p.x_stride + p.k_offset + i) * wv;
        }
    }
    for (var j = 0u; j < nt; j++) {
        store((t0 + j) * p.out_stride + p.out_offset + c, acc[j]);
    }
}
