//! Uploading weights: matrices as zero-padded rows (8-element units: packed f16, or f32) split
//! into row chunks that each fit one storage binding; small vectors as f32.

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
    /// 8-element units per padded row.
    pub(crate) row_units: usize,
    pub(crate) chunks: Vec<Chunk>,
}

impl GpuMatrix {
    /// Bytes of the GPU copy.
    pub(crate) fn bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.buffer.size()).sum()
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
        let row_bytes = cols * dtype.size_bytes();
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
        let elem = dtype.size_bytes();
        let row_bytes = cols * elem;
        let row_units = pad8(cols) / 8;
        let padded = (row_units * 8 * elem) as u64;
        if padded > max_binding {
            return Err(GpuError::BufferTooLarge {
                what: format!("one row of {name}"),
                bytes: padded,
                limit: max_binding,
            });
        }
        let chunk_rows = ((max_binding / padded) as usize).max(1);
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
                    view.slice(off..off + row_bytes).copy_from_slice(row);
                }
                next += 1;
            }
        }
        finish(&mut open, &mut chunks)?;
        if next != rows {
            return Err(bad(format!("segments cover {next} rows, {rows} needed")));
        }
        Ok(GpuMatrix { cols, f32: is_f32, row_units, chunks })
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
