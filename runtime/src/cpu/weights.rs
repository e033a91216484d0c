//! Zero-copy views of weight matrices inside the model file's bytes.
//!
//! A matrix is a list of parts, one per file segment: the rows of a nested FFN tensor are split
//! across level segments that are not contiguous in the file, so the kernels iterate over parts
//! and never assume one slice. Rows are read in place as `f16`, `f32` or quantised blocks (never
//! copied to an f32 model), and only the segments covering the requested rows are touched.

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::EngineError;
use crate::format::{DType, QK};
use crate::ModelFile;

/// Rows of one part, in the file's element type.
#[derive(Clone, Copy, Debug)]
pub(crate) enum RowData<'a> {
    /// Half-precision rows.
    F16(&'a [f16]),
    /// Single-precision rows.
    F32(&'a [f32]),
    /// Block-quantised rows (`q8_0`, `q4_0`, `q4_1`): whole 32-element blocks, as stored.
    Quant(DType, &'a [u8]),
}

impl<'a> RowData<'a> {
    /// Elements `[start, end)`, or `None` when out of bounds.
    pub(crate) fn get(&self, start: usize, end: usize) -> Option<RowData<'a>> {
        match self {
            RowData::F16(s) => s.get(start..end).map(RowData::F16),
            RowData::F32(s) => s.get(start..end).map(RowData::F32),
            RowData::Quant(dtype, b) => {
                // Only whole blocks can be addressed (quantised rows are whole blocks).
                if !start.is_multiple_of(QK) || !end.is_multiple_of(QK) || start > end {
                    return None;
                }
                let bb = dtype.block_bytes();
                b.get(start / QK * bb..end / QK * bb).map(|b| RowData::Quant(*dtype, b))
            }
        }
    }

    /// Whether these rows are block-quantised.
    pub(crate) fn is_quant(&self) -> bool {
        matches!(self, RowData::Quant(..))
    }

    /// Converts to f32 into `out` (lengths must be equal; extra elements are left alone),
    /// dequantising block-quantised rows; f16 with `half`'s slice conversion: F16C or FP16 instructions when the CPU has them (detected at
    /// run time), measured faster than a portable bit-level widening for whole rows.
    pub(crate) fn widen_into(self, out: &mut [f32]) {
        match self {
            RowData::F16(s) => {
                let n = s.len().min(out.len());
                s[..n].convert_to_f32_slice(&mut out[..n]);
            }
            RowData::F32(s) => {
                let n = s.len().min(out.len());
                out[..n].copy_from_slice(&s[..n]);
            }
            RowData::Quant(dtype, b) => {
                let n = (b.len() / dtype.block_bytes() * QK).min(out.len());
                crate::quant::decode_blocks(dtype, b, &mut out[..n]);
            }
        }
    }
}

/// `2^112`: the ratio between an f16 value and the f32 read from its bits by
/// [`f16_bits_unscaled`] (the f16 exponent bias is 15, the f32 one 127).
pub(crate) const F16_SCALE: f32 = f32::from_bits(0x7780_0000);

/// The f32 whose bits are the f16 `h`'s sign, exponent and mantissa moved into the f32 fields
/// (`sign | 000 | exponent(5) | mantissa(10) | 0(13)`): exactly `value(h) / 2^112` for every
/// finite `h`, normal or subnormal (an f16 subnormal lands on an f32 subnormal, which f32
/// arithmetic handles exactly). Infinities and NaNs come out as finite numbers: callers detect
/// them (exponent bits all ones, i.e. `h & 0x7fff >= 0x7c00`) and take an exact path.
///
/// This is a shift and a mask, so loops over it vectorise with the baseline instruction set
/// of every target (SSE2 on x86-64, NEON on aarch64), unlike `half`'s conversions, which
/// dispatch at run time to F16C or FP16 instructions through a call per few elements
/// unless the build enables those target features.
#[inline(always)]
pub(crate) fn f16_bits_unscaled(h: u16) -> f32 {
    // Moving the f16 into the top half and shifting right arithmetically by 3 puts the
    // exponent and mantissa in place and copies the sign into the 3 bits above the
    // exponent, which the mask clears.
    f32::from_bits((((u32::from(h) << 16) as i32) >> 3) as u32 & 0x8fff_ffff)
}

/// `h` (f16 bits) as f32, exactly for every value (infinities and NaNs included: the NaN
/// payload is kept), branch-free so that loops over it vectorise. The tests check
/// [`f16_bits_unscaled`] against it for every f16 value.
#[cfg(test)]
#[inline(always)]
pub(crate) fn widen_f16(h: u16) -> f32 {
    let finite = (f16_bits_unscaled(h) * F16_SCALE).to_bits();
    // For an all-ones exponent, `finite` is `sign | 0x4780_0000 | mantissa << 13`; setting
    // every exponent bit makes it the infinity or NaN with the same sign and payload.
    let special = 0u32.wrapping_sub(u32::from(h & 0x7c00 == 0x7c00)) & 0x7f80_0000;
    f32::from_bits(finite | special)
}

/// Rows `[first_row, first_row + rows)` of a matrix, contiguous in the file.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Part<'a> {
    /// Global index of the first row.
    pub(crate) first_row: usize,
    /// Number of rows.
    pub(crate) rows: usize,
    /// `rows * cols` elements.
    pub(crate) data: RowData<'a>,
}

/// The first `rows` rows of a `[*, cols]` tensor, as in-place parts.
#[derive(Clone, Debug)]
pub(crate) struct Matrix<'a> {
    /// Rows in use (a prefix of the tensor's rows).
    pub(crate) rows: usize,
    /// Elements per row.
    pub(crate) cols: usize,
    /// Parts in row order, covering `[0, rows)` exactly.
    pub(crate) parts: Vec<Part<'a>>,
}

impl<'a> Matrix<'a> {
    /// Rows `[0, rows)` of tensor `name`, which must have `cols` elements per row and at least
    /// `rows` rows. Fails (never panics) on a missing tensor, a shape mismatch, segments that
    /// do not cover the rows in order, or data that is not aligned for its element type.
    pub(crate) fn load(model: &'a ModelFile, name: &str, rows: usize, cols: usize) -> Result<Matrix<'a>, EngineError> {
        let info = model.view().tensor(name).map_err(crate::ModelError::from)?;
        let bad = |reason: String| EngineError::BadTensor { tensor: name.to_string(), reason };
        if info.row_elems() != cols as u64 {
            return Err(bad(format!("rows have {} elements, the architecture needs {cols}", info.row_elems())));
        }
        if info.rows() < rows as u64 {
            return Err(bad(format!("has {} rows, the submodel needs {rows}", info.rows())));
        }
        if cfg!(target_endian = "big") {
            // The file is little-endian and rows are read in place.
            return Err(bad("in-place reads need a little-endian CPU".into()));
        }
        let dtype = info.dtype;
        let row_bytes = dtype
            .row_bytes(cols as u64)
            .and_then(|b| usize::try_from(b).ok())
            .ok_or_else(|| bad(format!("{cols}-element rows cannot be stored as {dtype}")))?;
        let mut parts = Vec::new();
        let mut next = 0usize;
        if rows > 0 {
            for (first, bytes) in model.tensor_segments(name, rows as u64)? {
                let first = usize::try_from(first).map_err(|_| bad("row index overflow".into()))?;
                if first != next {
                    return Err(bad(format!(
                        "segments do not cover the rows in order: expected row {next}, segment starts at {first}"
                    )));
                }
                if row_bytes == 0 || bytes.len() % row_bytes != 0 {
                    return Err(bad(format!(
                        "segment of {} bytes is not a whole number of {row_bytes}-byte rows",
                        bytes.len()
                    )));
                }
                let seg_rows = (bytes.len() / row_bytes).min(rows - next);
                if seg_rows == 0 {
                    continue;
                }
                let bytes = &bytes[..seg_rows * row_bytes];
                let data = match dtype {
                    DType::F16 => {
                        RowData::F16(bytemuck::try_cast_slice::<u8, f16>(bytes).map_err(|e| misaligned(name, e))?)
                    }
                    DType::F32 => {
                        RowData::F32(bytemuck::try_cast_slice::<u8, f32>(bytes).map_err(|e| misaligned(name, e))?)
                    }
                    DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => RowData::Quant(dtype, bytes),
                };
                parts.push(Part { first_row: next, rows: seg_rows, data });
                next += seg_rows;
                if next == rows {
                    break;
                }
            }
        }
        if next != rows {
            return Err(bad(format!("segments cover rows [0, {next}) but {rows} rows are needed")));
        }
        Ok(Matrix { rows, cols, parts })
    }

    /// The dtype of the rows (of the first part; a matrix's parts all come from one tensor).
    pub(crate) fn dtype(&self) -> Option<DType> {
        self.parts.first().map(|p| match p.data {
            RowData::F16(_) => DType::F16,
            RowData::F32(_) => DType::F32,
            RowData::Quant(d, _) => d,
        })
    }

    /// Bytes of the rows in use, as stored.
    pub(crate) fn bytes(&self) -> usize {
        let row = self.dtype().and_then(|d| d.row_bytes(self.cols as u64)).unwrap_or(0) as usize;
        row.saturating_mul(self.rows)
    }

    /// Row `r`, or `None` when out of range.
    pub(crate) fn row(&self, r: usize) -> Option<RowData<'a>> {
        let part = self.parts.iter().find(|p| r >= p.first_row && r < p.first_row + p.rows)?;
        let start = (r - part.first_row) * self.cols;
        part.data.get(start, start + self.cols)
    }

    /// Rows `[r0, r1)` as a matrix of `r1 - r0` rows (row `r0` becomes row 0), in place; empty
    /// when the range is out of bounds or empty.
    pub(crate) fn row_range(&self, r0: usize, r1: usize) -> Matrix<'a> {
        let r1 = r1.min(self.rows);
        let r0 = r0.min(r1);
        let parts =
            self.parts_in(r0, r1).map(|(first, rows, data)| Part { first_row: first - r0, rows, data }).collect();
        Matrix { rows: r1 - r0, cols: self.cols, parts }
    }

    /// The pieces of the parts that intersect rows `[r0, r1)`: `(first global row, rows, data)`.
    pub(crate) fn parts_in(&self, r0: usize, r1: usize) -> impl Iterator<Item = (usize, usize, RowData<'a>)> + '_ {
        self.parts.iter().filter_map(move |p| {
            let s = r0.max(p.first_row);
            let e = r1.min(p.first_row + p.rows);
            if s >= e {
                return None;
            }
            let data = p.data.get((s - p.first_row) * self.cols, (e - p.first_row) * self.cols)?;
            Some((s, e - s, data))
        })
    }
}

fn misaligned(name: &str, e: bytemuck::PodCastError) -> EngineError {
    EngineError::Misaligned { tensor: name.to_string(), reason: format!("{e:?}") }
}
