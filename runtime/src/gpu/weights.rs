//! Uploading weights: matrices as zero-padded rows (8-element units: packed f16, or f32) split
//! into row chunks that each fit one storage binding; small vectors as f32. Block-quantised
//! rows (`q8_0`, `q4_0`, `q4_1`) are repacked row by row into whole `u32` words
//! ([`quant_row_words`], [`repack_quant_row`]): a row's block scales first, then its quants.

use super::device::Gpu;
use super::GpuError;
use crate::format::DType;
use crate::ModelFile;

/// `n` rounded up to a multiple of 8 (row padding of weights and activations, in elements).
pub(crate) fn pad8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

/// Rows `[row_start, row_start + rows)` of a matrix in one buffer.
#[derive(Debug)]
pub(crate) struct Chunk {
    pub(crate) buffer: wgpu::Buffer,
    pub(crate) row_start: usize,
    pub(crate) rows: usize,
}

/// The first `rows` rows of a `[*, cols]` weight tensor on the GPU.
#[derive(Debug)]
pub(crate) struct GpuMatrix {
    pub(crate) cols: usize,
    /// Stored as f32 (an f32 file) rather than packed f16.
    pub(crate) f32: bool,
    /// The block-quantised dtype of the rows (repacked, [`repack_quant_row`]), or `None` for
    /// f16 and f32 rows.
    pub(crate) quant: Option<DType>,
    /// 8-element units per padded row; for a quantised matrix, `u32` words per row
    /// ([`quant_row_words`]).
    pub(crate) row_units: usize,
    pub(crate) chunks: Vec<Chunk>,
}

impl GpuMatrix {
    /// Bytes of the GPU copy.
    pub(crate) fn bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.buffer.size()).sum()
    }

    /// Bytes of one row on the GPU (padding included).
    pub(crate) fn row_bytes(&self) -> u64 {
        match self.quant {
            Some(_) => self.row_units as u64 * 4,
            None => (self.row_units * 8 * if self.f32 { 4 } else { 2 }) as u64,
        }
    }

    /// `u32` words per row: 8 per 8-element unit of f32 weights, 4 per unit of packed f16 (two
    /// per word), and the repacked row's words for a quantised matrix.
    pub(crate) fn row_words(&self) -> usize {
        match self.quant {
            Some(_) => self.row_units,
            None => self.row_units * if self.f32 { 8 } else { 4 },
        }
    }

    /// Uploads rows `[0, rows)` of tensor `name` (which must have `cols` elements per row),
    /// split into chunks of at most `max_binding` bytes, one chunk at a time
    /// ([`GpuMatrix::build_with`]). Reads only the segments covering those rows; with
    /// `release_pages`, lets the OS drop the mapping's pages after each chunk.
    pub(crate) fn upload(
        gpu: &Gpu,
        model: &ModelFile,
        name: &str,
        rows: usize,
        cols: usize,
        max_binding: u64,
        release_pages: bool,
    ) -> Result<GpuMatrix, GpuError> {
        let info = checked_tensor(model, name, rows, cols)?;
        let pieces = model.tensor_segments(name, rows as u64)?;
        GpuMatrix::build_with(gpu, name, rows, cols, info.dtype, max_binding, pieces, &mut || {
            if release_pages {
                model.release_all()?;
            }
            Ok(())
        })
    }

    /// Uploads rows `[from, to)` of tensor `name` (`cols` elements per row) as a matrix of
    /// `to - from` rows (row 0 is the tensor's row `from`), in chunks of at most `max_binding`
    /// bytes. Reads only the segments covering those rows, skipping the rows before `from`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn upload_rows(
        gpu: &Gpu,
        model: &ModelFile,
        name: &str,
        from: usize,
        to: usize,
        cols: usize,
        max_binding: u64,
        release_pages: bool,
    ) -> Result<GpuMatrix, GpuError> {
        let info = model.view().tensor(name).map_err(crate::ModelError::from)?;
        let bad = |reason: String| GpuError::BadTensor { tensor: name.to_string(), reason };
        if info.row_elems() != cols as u64 {
            return Err(bad(format!("rows have {} elements, the architecture needs {cols}", info.row_elems())));
        }
        if info.rows() < to as u64 || to <= from {
            return Err(bad(format!("has {} rows, rows {from}..{to} needed", info.rows())));
        }
        let row_bytes = info.row_bytes() as usize;
        let pieces = model.tensor_segments(name, to as u64)?;
        // Re-base the pieces to start at `from`, skipping the rows before it without reading them.
        let shifted = pieces.into_iter().filter_map(|(first, bytes)| {
            let first = first as usize;
            let n = bytes.len() / row_bytes;
            if first + n <= from {
                return None;
            }
            let skip = from.saturating_sub(first);
            Some(((first + skip - from) as u64, bytes.get(skip * row_bytes..).unwrap_or(&[])))
        });
        // One chunk at a time; the mapping's pages are released after each when asked.
        GpuMatrix::build_with(gpu, name, to - from, cols, info.dtype, max_binding, shifted, &mut || {
            if release_pages {
                model.release_all()?;
            }
            Ok(())
        })
    }

    /// Uploads several `[rows, cols]` tensors stacked into one matrix: `parts` are `(name,
    /// rows, first_row)` in increasing `first_row` order, each tensor's rows landing at
    /// `first_row..first_row + rows`; rows no part covers (up to `total_rows`) are zero. One
    /// product over the stack computes every part's outputs in one dispatch, each output row
    /// exactly as a product over its own tensor would (rows are independent). The tensors must
    /// share one dtype.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn upload_stacked(
        gpu: &Gpu,
        model: &ModelFile,
        label: &str,
        parts: &[(&str, usize, usize)],
        total_rows: usize,
        cols: usize,
        max_binding: u64,
        release_pages: bool,
    ) -> Result<GpuMatrix, GpuError> {
        let mut dtype = None;
        let mut segments: Vec<(u64, &[u8])> = Vec::new();
        let mut next = 0usize;
        let mut gaps = Vec::new();
        for &(name, rows, first_row) in parts {
            let info = checked_tensor(model, name, rows, cols)?;
            let bad = |reason: String| GpuError::BadTensor { tensor: name.to_string(), reason };
            if *dtype.get_or_insert(info.dtype) != info.dtype {
                return Err(bad(format!("is {:?}, the other tensors of {label} are {dtype:?}", info.dtype)));
            }
            if first_row < next {
                return Err(bad(format!("would start at row {first_row} of {label}, before row {next}")));
            }
            gaps.push((next, first_row - next));
            for (first, bytes) in model.tensor_segments(name, rows as u64)? {
                segments.push((first + first_row as u64, bytes));
            }
            next = first_row + rows;
        }
        let Some(dtype) = dtype else {
            return Err(GpuError::BadTensor { tensor: label.to_string(), reason: "no tensors to stack".into() });
        };
        if total_rows < next {
            return Err(GpuError::BadTensor {
                tensor: label.to_string(),
                reason: format!("the parts need {next} rows, {total_rows} given"),
            });
        }
        gaps.push((next, total_rows - next));
        let row_bytes = dtype.row_bytes(cols as u64).unwrap_or(0) as usize;
        let zeros = vec![0u8; gaps.iter().map(|g| g.1).max().unwrap_or(0) * row_bytes];
        let mut pieces = segments;
        for (start, n) in gaps.into_iter().filter(|g| g.1 > 0) {
            pieces.push((start as u64, &zeros[..n * row_bytes]));
        }
        pieces.sort_by_key(|piece| piece.0);
        GpuMatrix::build_with(gpu, label, total_rows, cols, dtype, max_binding, pieces, &mut || {
            if release_pages {
                model.release_all()?;
            }
            Ok(())
        })
    }

    /// Uploads rows `[0, rows)` given as `(first_row, bytes)` pieces in row order (raw
    /// little-endian `dtype` rows of `cols` elements), in chunks of at most `max_binding` bytes.
    pub(crate) fn build<'a>(
        gpu: &Gpu,
        name: &str,
        rows: usize,
        cols: usize,
        dtype: DType,
        max_binding: u64,
        pieces: impl IntoIterator<Item = (u64, &'a [u8])>,
    ) -> Result<GpuMatrix, GpuError> {
        GpuMatrix::build_with(gpu, name, rows, cols, dtype, max_binding, pieces, &mut || Ok(()))
    }

    /// [`GpuMatrix::build`], one chunk at a time: each chunk is filled, unmapped and its upload
    /// submitted and waited for before the next is allocated, so the driver's staging copy of
    /// only one chunk is alive at a time (on unified-memory devices and lavapipe, staging copies
    /// of a whole model would double its peak resident memory); `after_chunk` runs after each
    /// (the engine releases the mapping's pages there).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn build_with<'a>(
        gpu: &Gpu,
        name: &str,
        rows: usize,
        cols: usize,
        dtype: DType,
        max_binding: u64,
        pieces: impl IntoIterator<Item = (u64, &'a [u8])>,
        after_chunk: &mut dyn FnMut() -> Result<(), GpuError>,
    ) -> Result<GpuMatrix, GpuError> {
        let bad = |reason: String| GpuError::BadTensor { tensor: name.to_string(), reason };
        if rows == 0 || cols == 0 {
            return Err(bad(format!("{rows} x {cols} is empty")));
        }
        let is_f32 = dtype == DType::F32;
        let quant = dtype.is_quantized().then_some(dtype);
        let row_bytes =
            dtype.row_bytes(cols as u64).ok_or_else(|| bad(format!("{cols} columns are not whole {dtype} blocks")))?
                as usize;
        let row_units = if quant.is_some() { quant_row_words(dtype, cols) } else { pad8(cols) / 8 };
        let padded = gpu_row_bytes(dtype, cols);
        if padded > max_binding {
            return Err(GpuError::BufferTooLarge {
                what: format!("one row of {name}"),
                bytes: padded,
                limit: max_binding,
            });
        }
        let chunk_rows = ((max_binding / padded) as usize).max(1);
        // One repacked quantised row (unused for f16 and f32 rows).
        let mut repacked = vec![0u8; if quant.is_some() { padded as usize } else { 0 }];
        let mut chunks: Vec<Chunk> = Vec::with_capacity(rows.div_ceil(chunk_rows));
        // The chunk being filled: its buffer and mapped view.
        let mut open: Option<(Chunk, wgpu::BufferViewMut)> = None;
        let mut finish =
            |open: &mut Option<(Chunk, wgpu::BufferViewMut)>, chunks: &mut Vec<Chunk>| -> Result<(), GpuError> {
                if let Some((chunk, view)) = open.take() {
                    drop(view);
                    chunk.buffer.unmap();
                    gpu.queue.submit([]);
                    gpu.wait()?;
                    chunks.push(chunk);
                    after_chunk()?;
                }
                Ok(())
            };
        let mut next = 0usize;
        for (first, bytes) in pieces {
            if first as usize != next || bytes.len() % row_bytes != 0 {
                return Err(bad(format!("segments do not cover rows in order at row {next}")));
            }
            for row in bytes.chunks_exact(row_bytes) {
                if next >= rows {
                    break;
                }
                if next.is_multiple_of(chunk_rows) {
                    finish(&mut open, &mut chunks)?;
                    let n = chunk_rows.min(rows - next);
                    let buffer = gpu.scoped(&format!("allocating {name}"), || {
                        gpu.device.create_buffer(&wgpu::BufferDescriptor {
                            label: Some(name),
                            size: n as u64 * padded,
                            usage: wgpu::BufferUsages::STORAGE,
                            mapped_at_creation: true,
                        })
                    })?;
                    let view = buffer.get_mapped_range_mut(..).map_err(|e| GpuError::Wgpu {
                        during: format!("mapping {name} for upload"),
                        message: e.to_string(),
                    })?;
                    open = Some((Chunk { buffer, row_start: next, rows: n }, view));
                }
                if let Some((chunk, view)) = open.as_mut() {
                    let off = (next - chunk.row_start) * padded as usize;
                    match quant {
                        Some(q) => {
                            repack_quant_row(q, row, &mut repacked);
                            view.slice(off..off + padded as usize).copy_from_slice(&repacked);
                        }
                        None => view.slice(off..off + row_bytes).copy_from_slice(row),
                    }
                }
                next += 1;
            }
        }
        finish(&mut open, &mut chunks)?;
        if next != rows {
            return Err(bad(format!("segments cover {next} rows, {rows} needed")));
        }
        Ok(GpuMatrix { cols, f32: is_f32, quant, row_units, chunks })
    }
}

/// `u32` words of one repacked row of `cols` elements (a multiple of 32) of a block-quantised
/// `dtype`: the scales (`q8_0`, `q4_0`: one f16 `d` per block, two per word, the last word
/// zero-padded when the block count is odd; `q4_1`: one word `d | m << 16` per block), then the
/// quants (`q8_0`: 8 words per block, the block's 32 `i8` in order; `q4_0`, `q4_1`: 4 words per
/// block, the block's 16 nibble bytes as stored).
pub(crate) fn quant_row_words(dtype: DType, cols: usize) -> usize {
    let blocks = cols / crate::format::QK;
    match dtype {
        DType::Q8_0 => blocks.div_ceil(2) + 8 * blocks,
        DType::Q4_0 => blocks.div_ceil(2) + 4 * blocks,
        _ => 5 * blocks,
    }
}

/// Bytes of one GPU row of `cols` elements of `dtype` (padded f16/f32 rows, repacked quantised
/// rows).
pub(crate) fn gpu_row_bytes(dtype: DType, cols: usize) -> u64 {
    if dtype.is_quantized() {
        quant_row_words(dtype, cols) as u64 * 4
    } else {
        (pad8(cols) * dtype.size_bytes()) as u64
    }
}

/// Writes the file row `src` (whole ggml blocks of `dtype`) into `dst` in the GPU layout of
/// [`quant_row_words`]: the scale fields of every block first, then every block's quant bytes.
/// A prefix of rows stays the prefix submodel: rows are repacked independently.
pub(crate) fn repack_quant_row(dtype: DType, src: &[u8], dst: &mut [u8]) {
    let bb = dtype.block_bytes();
    let blocks = src.len() / bb;
    // Scale bytes per block (d, or d and m) and where the quants start.
    let sb = if dtype == DType::Q4_1 { 4 } else { 2 };
    let qstart = 4 * (quant_row_words(dtype, blocks * crate::format::QK) - blocks * (bb - sb) / 4);
    dst.fill(0);
    for (b, block) in src.chunks_exact(bb).enumerate() {
        dst[b * sb..(b + 1) * sb].copy_from_slice(&block[..sb]);
        let q = bb - sb;
        dst[qstart + b * q..qstart + (b + 1) * q].copy_from_slice(&block[sb..]);
    }
}

/// A storage buffer holding `data` (at least 16 bytes, zero-padded).
pub(crate) fn upload_f32(gpu: &Gpu, label: &str, data: &[f32]) -> Result<wgpu::Buffer, GpuError> {
    upload_bytes(gpu, label, bytemuck::cast_slice(data), wgpu::BufferUsages::STORAGE)
}

/// A buffer holding `bytes` (size rounded up to 16), with `usage`.
pub(crate) fn upload_bytes(
    gpu: &Gpu,
    label: &str,
    bytes: &[u8],
    usage: wgpu::BufferUsages,
) -> Result<wgpu::Buffer, GpuError> {
    let size = (bytes.len() as u64).max(16).div_ceil(16) * 16;
    if size > gpu.max_binding() {
        return Err(GpuError::BufferTooLarge { what: label.to_string(), bytes: size, limit: gpu.max_binding() });
    }
    let buf = gpu.scoped(&format!("allocating {label}"), || {
        gpu.device.create_buffer(&wgpu::BufferDescriptor { label: Some(label), size, usage, mapped_at_creation: true })
    })?;
    {
        let mut view = buf
            .get_mapped_range_mut(..)
            .map_err(|e| GpuError::Wgpu { during: format!("mapping {label}"), message: e.to_string() })?;
        view.slice(..bytes.len()).copy_from_slice(bytes);
    }
    buf.unmap();
    Ok(buf)
}

/// A zero-initialised buffer of `bytes` bytes (at least 16) with `usage`, within `limit`.
pub(crate) fn zeroed(
    gpu: &Gpu,
    label: &str,
    bytes: u64,
    usage: wgpu::BufferUsages,
    limit: u64,
) -> Result<wgpu::Buffer, GpuError> {
    let size = bytes.max(16).div_ceil(16) * 16;
    if size > limit {
        return Err(GpuError::BufferTooLarge { what: label.to_string(), bytes: size, limit });
    }
    gpu.scoped(&format!("allocating {label}"), || {
        gpu.device.create_buffer(&wgpu::BufferDescriptor { label: Some(label), size, usage, mapped_at_creation: false })
    })
}

/// The tensor `name` of `model`, checked to hold at least `rows` rows (at least one) of
/// `cols` elements.
fn checked_tensor<'m>(
    model: &'m ModelFile,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<&'m crate::format::TensorInfo, GpuError> {
    let info = model.view().tensor(name).map_err(crate::ModelError::from)?;
    let bad = |reason: String| GpuError::BadTensor { tensor: name.to_string(), reason };
    if info.row_elems() != cols as u64 {
        return Err(bad(format!("rows have {} elements, the architecture needs {cols}", info.row_elems())));
    }
    if info.rows() < rows as u64 || rows == 0 {
        return Err(bad(format!("has {} rows, {rows} needed", info.rows())));
    }
    Ok(info)
}
