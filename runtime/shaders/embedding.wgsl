// Embedding gather: x[i, :] = E[tokens[i], :] * scale for every token whose row lies in this chunk of
// the table (rows [row_start, row_start + rows)). Big tables are split into chunks by rows, one
// dispatch per chunk; each token is written by exactly one chunk.
//
// Weights: f16 pairs packed in u32 (low half first), or f32 when F32_WEIGHTS; rows padded to a
// multiple of 8 elements. Q8_0, Q4_0 or Q4_1: block-quantised rows repacked as in
// matmul_quant.wgsl (the block scales, then the quants; cols a multiple of 32).

override F32_WEIGHTS: bool = false;
override Q8_0: bool = false;
override Q4_0: bool = false;
override Q4_1: bool = false;

struct Params {
    row_start: u32,
    rows: u32,
    cols: u32,
    // u32 words per padded weight row.
    row_words: u32,
    // floats per row of x.
    out_stride: u32,
    // Multiplies every value (sqrt(d_model) for Gemma 3n, 1 otherwise).
    scale: f32,
}

struct Step {
    pos0: u32,
    t: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> tokens: array<u32>;
@group(0) @binding(3) var<storage, read> w: array<u32>;
@group(0) @binding(4) var<storage, read_write> x: array<f32>;

// Element `col` of repacked quantised row `row`.
fn quant_weight(row: u32, col: u32) -> f32 {
    let base = row * p.row_words;
    let nb = p.cols / 32u;
    let b = col / 32u;
    let e = col % 32u;
    if Q8_0 {
        let d = unpack2x16float(w[base + b / 2u])[b & 1u];
        let word = w[base + (nb + 1u) / 2u + 8u * b + e / 4u];
        let q = bitcast<i32>(word << (24u - 8u * (e % 4u))) >> 24u;
        return d * f32(q);
    }
    let hi = e / 16u;
    let j = e % 16u;
    var s = (nb + 1u) / 2u;
    if Q4_1 {
        s = nb;
    }
    let word = w[base + s + 4u * b + j / 4u];
    let n = f32((word >> (8u * (j % 4u) + 4u * hi)) & 15u);
    if Q4_1 {
        let dm = unpack2x16float(w[base + b]);
        return dm.x * n + dm.y;
    }
    let d = unpack2x16float(w[base + b / 2u])[b & 1u];
    return d * (n - 8.0);
}

fn weight(row: u32, col: u32) -> f32 {
    if Q8_0 || Q4_0 || Q4_1 {
        return quant_weight(row, col);
    }
    if F32_WEIGHTS {
        return bitcast<f32>(w[row * p.row_words + col]);
    }
    let pair = unpack2x16float(w[row * p.row_words + col / 2u]);
    return select(pair.x, pair.y, (col & 1u) == 1u);
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let col = gid.x;
    let i = gid.y;
    if col >= p.cols || i >= step.t {
        return;
    }
    let tok = tokens[i];
    if tok < p.row_start || tok - p.row_start >= p.rows {
        return;
    }
    x[i * p.out_stride + col] = weight(tok - p.row_start, col) * p.scale;
}
