//! Dequantisation of ggml tensor blocks to f32, element for element as ggml's
//! `dequantize_row_*` (ggml-quants.c) computes them, including the order of the f32 operations
//! (so results are bit-identical, not merely close).

use super::reader::GgmlType;

/// `bytes` does not hold a whole number of blocks matching `out`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{ty} data of {bytes} bytes cannot hold {elems} elements ({block_elems} per {block_bytes}-byte block)")]
pub struct SizeMismatch {
    /// Type name.
    pub ty: &'static str,
    /// Input byte count.
    pub bytes: usize,
    /// Output element count.
    pub elems: usize,
    /// Elements per block.
    pub block_elems: u64,
    /// Bytes per block.
    pub block_bytes: u64,
}

fn f16(b: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Dequantises `bytes` (whole blocks of `ty`) into `out`; `out.len()` must be the element
/// count the bytes encode.
// Index loops mirror ggml's `dequantize_row_*` line for line, which is what makes them
// checkable against it.
#[allow(clippy::needless_range_loop)]
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), SizeMismatch> {
    let be = ty.block_elems() as usize;
    let bb = ty.block_bytes() as usize;
    if !out.len().is_multiple_of(be) || bytes.len() != out.len() / be * bb {
        return Err(SizeMismatch {
            ty: ty.name(),
            bytes: bytes.len(),
            elems: out.len(),
            block_elems: ty.block_elems(),
            block_bytes: ty.block_bytes(),
        });
    }
    let blocks = bytes.chunks_exact(bb).zip(out.chunks_exact_mut(be));
    match ty {
        GgmlType::F32 => {
            for (b, y) in blocks {
                y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (b, y) in blocks {
                y[0] = f16(b, 0);
            }
        }
        GgmlType::Bf16 => {
            for (b, y) in blocks {
                y[0] = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
            }
        }
        // block_q8_0 { f16 d; i8 qs[32]; }: y = qs * d.
        GgmlType::Q8_0 => {
            for (b, y) in blocks {
                let d = f16(b, 0);
                for j in 0..32 {
                    y[j] = f32::from(b[2 + j] as i8) * d;
                }
            }
        }
        // block_q4_0 { f16 d; u8 qs[16]; }: low nibbles are elements 0..16, high 16..32, minus 8.
        GgmlType::Q4_0 => {
            for (b, y) in blocks {
                let d = f16(b, 0);
                for j in 0..16 {
                    let q = b[2 + j];
                    y[j] = (i32::from(q & 0x0F) - 8) as f32 * d;
                    y[j + 16] = (i32::from(q >> 4) - 8) as f32 * d;
                }
            }
        }
        // block_q4_1 { f16 d; f16 m; u8 qs[16]; }: y = q * d + m.
        GgmlType::Q4_1 => {
            for (b, y) in blocks {
                let d = f16(b, 0);
                let m = f16(b, 2);
                for j in 0..16 {
                    let q = b[4 + j];
                    y[j] = f32::from(q & 0x0F) * d + m;
                    y[j + 16] = f32::from(q >> 4) * d + m;
                }
            }
        }
        // block_q4_K { f16 d; f16 dmin; u8 scales[12]; u8 qs[128]; }: four 64-element groups,
        // each two 32-element halves (low then high nibbles) with 6-bit scale and min.
        GgmlType::Q4K => {
            for (b, y) in blocks {
                let d = f16(b, 0);
                let min = f16(b, 2);
                let scales = &b[4..16];
                let qs = &b[16..144];
                for g in 0..4 {
                    let (sc1, m1) = scale_min_k4(2 * g, scales);
                    let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
                    let (d1, m1) = (d * f32::from(sc1), min * f32::from(m1));
                    let (d2, m2) = (d * f32::from(sc2), min * f32::from(m2));
                    let q = &qs[32 * g..32 * g + 32];
                    let y = &mut y[64 * g..64 * g + 64];
                    for l in 0..32 {
                        y[l] = d1 * f32::from(q[l] & 0x0F) - m1;
                        y[32 + l] = d2 * f32::from(q[l] >> 4) - m2;
                    }
                }
            }
        }
        // block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d; }: two 128-element halves.
        GgmlType::Q6K => {
            for (b, y) in blocks {
                let d = f16(b, 208);
                for n in 0..2 {
                    let ql = &b[64 * n..64 * n + 64];
                    let qh = &b[128 + 32 * n..128 + 32 * n + 32];
                    let sc = &b[192 + 8 * n..192 + 8 * n + 8];
                    let y = &mut y[128 * n..128 * n + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = i32::from((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) - 32;
                        let q2 = i32::from((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
                        let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                        let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                        let s = |k: usize| d * f32::from(sc[k] as i8);
                        y[l] = s(is) * q1 as f32;
                        y[l + 32] = s(is + 2) * q2 as f32;
                        y[l + 64] = s(is + 4) * q3 as f32;
                        y[l + 96] = s(is + 6) * q4 as f32;
                    }
                }
            }
        }
    }
    Ok(())
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` (0..8) of a Q4_K block.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}
