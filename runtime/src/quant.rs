//! Block quantisation of weight rows: encoding f32 rows into the block layouts of
//! [`DType::Q8_0`], [`DType::Q4_0`] and [`DType::Q4_1`] (and plain `f16`/`f32`), and decoding
//! them back. The layouts are ggml's (docs/format.md 5.4); this is an independent
//! implementation of them.
//!
//! Blocks run along a row, never across rows, so the first `k` rows of a quantised tensor are
//! byte for byte the quantised `k`-row tensor: every nested submodel still reads a prefix.
//!
//! Encoding (one block `x[0..32]`):
//! - `q8_0`: `d = max|x| / 127`, `q = round(x / d)` (ties away from zero), stored `f16(d)`, `q`;
//! - `q4_0`: `v` = the element of largest magnitude (with its sign), `d = v / -8`,
//!   `n = min(15, trunc(x / d + 8.5))`, stored `f16(d)`, nibbles;
//! - `q4_1`: `d = (max - min) / 15`, `n = min(15, trunc((x - min) / d + 0.5))`, stored `f16(d)`,
//!   `f16(min)`, nibbles.
//!
//! Decoding uses the stored (f16) scales: `d * q`, `d * (n - 8)`, `d * n + m`.

use half::f16;

use crate::format::{DType, FormatError, QK};

/// Appends row `src` encoded in `dtype` to `out`. `src.len()` must be a multiple of
/// [`dtype.block_elems()`](DType::block_elems) ([`FormatError::BlockAlignment`] otherwise).
pub fn encode_row(dtype: DType, src: &[f32], out: &mut Vec<u8>) -> Result<(), FormatError> {
    let Some(n) = dtype.row_bytes(src.len() as u64) else {
        return Err(block_error(dtype, src.len()));
    };
    out.reserve(n as usize);
    match dtype {
        DType::F32 => src.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::F16 => src.iter().for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        DType::Q8_0 => src.chunks_exact(QK).for_each(|b| encode_q8_0(b, out)),
        DType::Q4_0 => src.chunks_exact(QK).for_each(|b| encode_q4_0(b, out)),
        DType::Q4_1 => src.chunks_exact(QK).for_each(|b| encode_q4_1(b, out)),
    }
    Ok(())
}

/// Decodes the row `src` (bytes in `dtype`) into `out`, whose length is the row's element
/// count. Errors when `src` is not exactly the bytes of `out.len()` elements.
pub fn decode_row(dtype: DType, src: &[u8], out: &mut [f32]) -> Result<(), FormatError> {
    match dtype.row_bytes(out.len() as u64) {
        Some(n) if n == src.len() as u64 => {}
        Some(n) => {
            return Err(FormatError::LengthMismatch {
                tensor: "<row>".to_string(),
                expected: n,
                found: src.len() as u64,
            })
        }
        None => return Err(block_error(dtype, out.len())),
    }
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => decode_blocks(dtype, src, out),
    }
    Ok(())
}

/// Decodes whole blocks of a quantised `dtype`: `out.len() / 32` blocks from `src` (which must
/// hold at least that many; extra bytes or elements are left alone).
pub(crate) fn decode_blocks(dtype: DType, src: &[u8], out: &mut [f32]) {
    let bb = dtype.block_bytes();
    for (o, b) in out.chunks_exact_mut(QK).zip(src.chunks_exact(bb)) {
        let d = f16_at(b, 0);
        match dtype {
            DType::Q8_0 => {
                for (v, &q) in o.iter_mut().zip(&b[2..2 + QK]) {
                    *v = d * f32::from(q as i8);
                }
            }
            DType::Q4_0 => {
                let (lo, hi) = o.split_at_mut(QK / 2);
                for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(&b[2..2 + QK / 2]) {
                    *l = d * f32::from(i16::from(q & 0x0f) - 8);
                    *h = d * f32::from(i16::from(q >> 4) - 8);
                }
            }
            DType::Q4_1 => {
                let m = f16_at(b, 2);
                let (lo, hi) = o.split_at_mut(QK / 2);
                for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(&b[4..4 + QK / 2]) {
                    *l = d * f32::from(q & 0x0f) + m;
                    *h = d * f32::from(q >> 4) + m;
                }
            }
            DType::F32 | DType::F16 => {}
        }
    }
}

/// The f16 at byte `at` of a block, as f32.
#[inline(always)]
pub(crate) fn f16_at(block: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

fn block_error(dtype: DType, row_elems: usize) -> FormatError {
    FormatError::BlockAlignment {
        tensor: "<row>".to_string(),
        dtype: dtype.name(),
        row_elems: row_elems as u64,
        block: dtype.block_elems() as u64,
    }
}

fn encode_q8_0(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    // `as i8` saturates (and maps NaN to 0); finite inputs stay within -127..=127.
    out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
}

fn encode_q4_0(x: &[f32], out: &mut Vec<u8>) {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    let n = |v: f32| ((v * id + 8.5) as u8).min(15);
    let (lo, hi) = x.split_at(QK / 2);
    out.extend(lo.iter().zip(hi).map(|(&a, &b)| n(a) | (n(b) << 4)));
}

fn encode_q4_1(x: &[f32], out: &mut Vec<u8>) {
    let min = x.iter().fold(f32::INFINITY, |m, &v| m.min(v));
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
    let n = |v: f32| (((v - min) * id + 0.5) as u8).min(15);
    let (lo, hi) = x.split_at(QK / 2);
    out.extend(lo.iter().zip(hi).map(|(&a, &b)| n(a) | (n(b) << 4)));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
            })
            .collect()
    }

    #[test]
    fn block_sizes() {
        assert_eq!(DType::Q8_0.row_bytes(64), Some(68));
        assert_eq!(DType::Q4_0.row_bytes(64), Some(36));
        assert_eq!(DType::Q4_1.row_bytes(64), Some(40));
        assert_eq!(DType::Q4_1.row_bytes(33), None);
        assert_eq!(DType::F16.row_bytes(33), Some(66));
        for d in DType::ALL {
            assert_eq!(DType::from_code(d.code()), Some(d));
            assert_eq!(DType::from_name(d.name()), Some(d));
        }
        assert_eq!(DType::from_code(4), None, "4 is the blob code, not a tensor dtype");
    }

    #[test]
    fn round_trip_error_is_within_a_step() {
        let x = lcg(7, 32 * 9);
        for dtype in [DType::Q8_0, DType::Q4_0, DType::Q4_1] {
            let mut bytes = Vec::new();
            encode_row(dtype, &x, &mut bytes).unwrap();
            assert_eq!(bytes.len() as u64, dtype.row_bytes(x.len() as u64).unwrap());
            let mut y = vec![0.0; x.len()];
            decode_row(dtype, &bytes, &mut y).unwrap();
            for (b, (xb, yb)) in x.chunks(QK).zip(y.chunks(QK)).enumerate() {
                let d = f16_at(&bytes[b * dtype.block_bytes()..], 0).abs();
                for (a, c) in xb.iter().zip(yb) {
                    // Half a step (a whole step for q4_0, whose 16 levels reach `7 d` on the side
                    // opposite the largest magnitude `8 d`), plus the f16 rounding of the scale
                    // (and of q4_1's minimum).
                    let steps = if dtype == DType::Q4_0 { 1.0 } else { 0.5 };
                    let tol = d * steps + xb.iter().fold(0.0f32, |m, v| m.max(v.abs())) * 2e-3 + 1e-6;
                    assert!((a - c).abs() <= tol, "{dtype} block {b}: {a} vs {c} (d {d})");
                }
            }
        }
    }

    #[test]
    fn zero_and_constant_blocks() {
        for dtype in [DType::Q8_0, DType::Q4_0, DType::Q4_1] {
            for x in [vec![0.0f32; 32], vec![0.25f32; 32], vec![-3.0f32; 32]] {
                let mut bytes = Vec::new();
                encode_row(dtype, &x, &mut bytes).unwrap();
                let mut y = vec![9.0; 32];
                decode_row(dtype, &bytes, &mut y).unwrap();
                for (a, b) in x.iter().zip(&y) {
                    assert!((a - b).abs() <= a.abs() * 2e-3, "{dtype}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn bad_lengths_are_errors() {
        let mut out = Vec::new();
        assert!(matches!(encode_row(DType::Q4_0, &[0.0; 31], &mut out), Err(FormatError::BlockAlignment { .. })));
        let mut y = [0.0f32; 32];
        assert!(decode_row(DType::Q8_0, &[0u8; 33], &mut y).is_err());
        assert!(decode_row(DType::Q8_0, &[0u8; 34], &mut y).is_ok());
    }
}
