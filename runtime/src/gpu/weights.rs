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
    /// split into chunks of at most `max_binding` bytes. Reads only the segments covering
    /// those rows.
    pub(crate) fn upload(
        gpu: &Gpu,
        model: &ModelFile,
        name: &str,
        rows: usize,
        cols: usize,
        max_binding: u64,
    ) -> Result<GpuMatrix, GpuError> {
        let info = model.view().tensor(name).map_err(crate::ModelError::from)?;
        let bad = |reason: String| GpuError::BadTensor { tensor: name.to_string(), reason };
        if info.row_elems() != cols as u64 {
            return Err(bad(format!("rows have {} elements, the architecture needs {cols}", info.row_elems())));
        }
        if info.rows() < rows as u64 || rows == 0 {
            return Err(bad(format!("has {} rows, {rows} needed", info.rows())));
        }
        GpuMatrix::build(gpu, name, rows, cols, info.dtype, max_binding, model.tensor_segments(name, rows as u64)?)
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
        let n_chunks = rows.div_ceil(chunk_rows);
        let chunks: Vec<Chunk> = gpu.scoped(&format!("allocating {name}"), || {
            (0..n_chunks)
                .map(|c| {
                    let row_start = c * chunk_rows;
                    let n = chunk_rows.min(rows - row_start);
                    let buffer = gpu.device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some(name),
                        size: n as u64 * padded,
                        usage: wgpu::BufferUsages::STORAGE,
                        mapped_at_creation: true,
                    });
                    Chunk { buffer, row_start, rows: n }
                })
                .collect()
        })?;
        let mut views = Vec::with_capacity(chunks.len());
        for c in &chunks {
            views.push(c.buffer.get_mapped_range_mut(..).map_err(|e| GpuError::Wgpu {
                during: format!("mapping {name} for upload"),
                message: e.to_string(),
            })?);
        }
        let mut next = 0usize;
        for (first, bytes) in pieces {
            if first as usize != next || bytes.len() % row_bytes != 0 {
                return Err(bad(format!("segments do not cover rows in order at row {next}")));
            }
            for row in bytes.chunks_exact(row_bytes) {
                if next >= rows {
                    break;
                }
                let c = next / chunk_rows;
                let off = (next - c * chunk_rows) * padded as usize;
                views[c].slice(off..off + row_bytes).copy_from_slice(row);
                next += 1;
            }
        }
        drop(views);
        for c in &chunks {
            c.buffer.unmap();
        }
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
