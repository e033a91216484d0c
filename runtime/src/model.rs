//! [`ModelFile`]: an opened `.matf` (memory map or owned bytes) plus its validated view.

use std::path::{Path, PathBuf};

use half::f16;

use crate::format::{DType, FileView, FormatError, Metadata};
use crate::mmap::MappedFile;

/// Errors opening or reading a model file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// The file cannot be opened, inspected or mapped.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The path given.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a valid `.matf` (or a check of its data failed).
    #[error(transparent)]
    Format(#[from] FormatError),
    /// More rows were requested than the tensor has.
    #[error("tensor {tensor} has {rows} rows, {requested} requested")]
    RowsOutOfRange {
        /// Tensor name.
        tensor: String,
        /// Rows in the tensor.
        rows: u64,
        /// Rows requested.
        requested: u64,
    },
    /// A file re-opened after growing is not the same model grown by whole levels (its
    /// header changed, it shrank, or it was not opened from a path).
    #[error("grown file does not extend the opened model: {reason}")]
    GrownFileMismatch {
        /// What differs.
        reason: String,
    },
}

/// Where the bytes live.
enum Storage {
    /// A read-only memory map.
    Mapped(MappedFile),
    /// Owned bytes in a 16-byte-aligned buffer (`len` bytes are used).
    Owned { words: Vec<u128>, len: usize },
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m.bytes(),
            Storage::Owned { words, len } => {
                let all: &[u8] = bytemuck::cast_slice(words);
                &all[..*len]
            }
        }
    }
}

/// An opened `.matf`: storage (a read-only memory map, or owned 16-byte-aligned bytes) plus
/// its validated [`FileView`]. Opening reads only the header; [`verify`](Self::verify) reads
/// everything. `Send + Sync`; share it as `Arc<ModelFile>`.
///
/// Segment offsets are multiples of the file's alignment (at least 4 KiB) and the storage is
/// page- or 16-byte-aligned, so segment slices can be cast to `f32`/`f16` slices directly.
pub struct ModelFile {
    storage: Storage,
    view: FileView,
    path: Option<PathBuf>,
    /// A copy of the header bytes as parsed (a mapping would show later rewrites of the file).
    header: Box<[u8]>,
}

impl std::fmt::Debug for ModelFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelFile")
            .field("path", &self.path)
            .field("mapped", &matches!(self.storage, Storage::Mapped(_)))
            .field("file_len", &self.view.file_len)
            .field("available_levels", &self.view.available_levels)
            .field("n_levels", &self.view.n_levels())
            .field("n_tensors", &self.view.tensors.len())
            .finish()
    }
}

impl ModelFile {
    /// Maps the file read-only and parses its header. Costs O(header): no data page is touched.
    pub fn open(path: impl AsRef<Path>) -> Result<ModelFile, ModelError> {
        let path = path.as_ref();
        let open_err = |source| ModelError::Open { path: path.display().to_string(), source };
        let file = std::fs::File::open(path).map_err(open_err)?;
        let storage = Storage::Mapped(MappedFile::map(&file).map_err(open_err)?);
        let view = FileView::parse(storage.bytes())?;
        let header = header_copy(&storage, &view);
        Ok(ModelFile { storage, view, path: Some(path.to_path_buf()), header })
    }

    /// Takes a file held in memory (copied into a 16-byte-aligned buffer) and parses its header.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<ModelFile, ModelError> {
        let len = bytes.len();
        let mut words = vec![0u128; len.div_ceil(16)];
        bytemuck::cast_slice_mut::<u128, u8>(&mut words)[..len].copy_from_slice(&bytes);
        drop(bytes);
        let storage = Storage::Owned { words, len };
        let view = FileView::parse(storage.bytes())?;
        let header = header_copy(&storage, &view);
        Ok(ModelFile { storage, view, path: None, header })
    }

    /// The validated header.
    pub fn view(&self) -> &FileView {
        &self.view
    }

    /// The metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.view.metadata
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        self.storage.bytes()
    }

    /// The content of blob `id` (the stored tokenizer is
    /// [`TOKENIZER_JSON_BLOB`](crate::format::TOKENIZER_JSON_BLOB)), its CRC-32 checked;
    /// `Ok(None)` when the file has no such blob. Reads only the blob's pages.
    pub fn blob(&self, id: &str) -> Result<Option<&[u8]>, ModelError> {
        Ok(self.view.blob_bytes(self.bytes(), id)?)
    }

    /// The path, when opened from a file.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Tells the OS it may drop every resident page of the mapping. For a backend that has
    /// copied the weights elsewhere (the GPU engine after an upload): the CPU-side copies then
    /// stop counting in the process's resident memory. Nothing becomes unreadable: a later read
    /// faults the same file contents back in (the CPU engine and the parsed header keep
    /// working). Returns the bytes advised (0 for a file held in owned memory and on non-unix
    /// targets).
    pub fn release_all(&self) -> Result<u64, ModelError> {
        let Storage::Mapped(map) = &self.storage else { return Ok(0) };
        map.release_range(0, self.bytes().len()).map_err(|source| ModelError::Open {
            path: self.path.as_ref().map_or_else(String::new, |p| p.display().to_string()),
            source,
        })
    }

    /// Tells the OS it may drop the resident pages of every level above `level`: the byte range
    /// from the start of level `level + 1`'s region (`level_ends[level]` aligned up to the
    /// file's alignment, then up to 64 KiB so that it is page-aligned on 4, 16 and 64 KiB
    /// page systems) to the end of the file. Level regions are contiguous, so that range holds
    /// only data of levels `> level`. Use it after switching every session of this file to
    /// submodels whose [`max_level`](crate::Submodel::max_level) is at most `level`: resident
    /// memory then really falls. Nothing becomes unreadable: a later read of those levels
    /// faults the same file contents back in.
    ///
    /// Returns the bytes advised: 0 when there is nothing above `level` in this file, for a
    /// file held in owned memory ([`from_bytes`](Self::from_bytes)) and on non-unix targets.
    /// Errors only if the OS rejects the advice.
    pub fn release_levels_above(&self, level: usize) -> Result<u64, ModelError> {
        /// Multiple of the OS page size on 4, 16 and 64 KiB page systems.
        const GRANULE: u64 = 64 * 1024;
        let Storage::Mapped(map) = &self.storage else { return Ok(0) };
        let file_len = self.bytes().len() as u64;
        let Some(&end) = self.view.level_ends.get(level) else { return Ok(0) };
        let align = self.view.alignment.max(GRANULE);
        let start = end.div_ceil(align).saturating_mul(align);
        if start >= file_len {
            return Ok(0);
        }
        // Both fit in `usize`: they are at most the mapped length.
        map.release_range(start as usize, (file_len - start) as usize).map_err(|source| ModelError::Open {
            path: self.path.as_ref().map_or_else(String::new, |p| p.display().to_string()),
            source,
        })
    }

    /// Re-maps a file opened with [`open`](Self::open) after more levels were appended to it
    /// (a download that continued from a level boundary). Returns `Ok(None)` if its length
    /// is unchanged. Otherwise checks that the header is byte-identical to this one (the same
    /// model), that the new length is a level end, and the checksums and padding of only the
    /// newly available levels (`self.view().available_levels..new.available_levels`), and
    /// returns the grown file; `self` stays valid and unchanged.
    ///
    /// Errors: [`ModelError::GrownFileMismatch`] for a file held in memory, a file that
    /// shrank or whose header changed; [`FormatError::TruncatedInsideLevel`] for a length
    /// inside a level; [`FormatError::SegmentChecksum`] or [`FormatError::NonZeroPadding`]
    /// for corrupt appended bytes.
    pub fn reopen_grown(&self) -> Result<Option<ModelFile>, ModelError> {
        let mismatch = |reason: String| ModelError::GrownFileMismatch { reason };
        let Some(path) = self.path.as_deref() else {
            return Err(mismatch("the model was not opened from a path".to_string()));
        };
        let open_err = |source| ModelError::Open { path: path.display().to_string(), source };
        let file = std::fs::File::open(path).map_err(open_err)?;
        let old_len = self.view.file_len;
        let new_len = file.metadata().map_err(open_err)?.len();
        if new_len == old_len {
            return Ok(None);
        }
        if new_len < old_len {
            return Err(mismatch(format!("the file shrank from {old_len} to {new_len} bytes")));
        }
        let storage = Storage::Mapped(MappedFile::map(&file).map_err(open_err)?);
        let bytes = storage.bytes();
        if bytes.get(..self.header.len()) != Some(&self.header[..]) {
            return Err(mismatch("the header differs from the opened file's (another model)".to_string()));
        }
        let view = FileView::parse(bytes)?;
        let before = self.view.available_levels;
        if view.available_levels < before {
            return Err(mismatch(format!("{} levels available, fewer than {before}", view.available_levels)));
        }
        view.verify_levels(bytes, before..view.available_levels)?;
        let header = header_copy(&storage, &view);
        Ok(Some(ModelFile { storage, view, path: Some(path.to_path_buf()), header }))
    }

    /// Checks every checksum and padding byte (reads the whole file).
    pub fn verify(&self) -> Result<(), ModelError> {
        Ok(self.view.verify(self.bytes())?)
    }

    /// The raw bytes of rows `[0, rows_end)` of tensor `name`, as one `(first_row, bytes)`
    /// slice per segment overlapping the range (the last one cut at `rows_end`). Errors if a
    /// needed level is not in this (cut) file or `rows_end` exceeds the tensor's rows.
    pub fn tensor_segments(&self, name: &str, rows_end: u64) -> Result<Vec<(u64, &[u8])>, ModelError> {
        let t = self.view.tensor(name)?;
        if rows_end > t.rows() {
            return Err(ModelError::RowsOutOfRange { tensor: name.to_string(), rows: t.rows(), requested: rows_end });
        }
        let row_bytes = t.row_bytes();
        let bytes = self.bytes();
        let mut out = Vec::new();
        for seg in &t.segments {
            if seg.row_start >= rows_end {
                continue;
            }
            let data = self.view.segment_bytes(bytes, seg)?;
            let take = (rows_end.min(seg.row_end) - seg.row_start) * row_bytes;
            // `take <= seg.byte_len == data.len()`, validated at parse.
            let data = data.get(..take as usize).unwrap_or(data);
            out.push((seg.row_start, data));
        }
        Ok(out)
    }

    /// The whole tensor decoded to `f32` (dequantised if block-quantised), row-major. Errors if part of it is in a level this
    /// (cut) file does not contain.
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>, ModelError> {
        let t = self.view.tensor(name)?;
        let mut out = Vec::with_capacity(t.n_elements() as usize);
        for (_, data) in self.tensor_segments(name, t.rows())? {
            match t.dtype {
                DType::F32 => out.extend(data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
                DType::F16 => out.extend(data.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())),
                DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => {
                    // Whole blocks only: a parsed quantised tensor's segments are whole rows.
                    let start = out.len();
                    let n = data.len() / t.dtype.block_bytes() * crate::format::QK;
                    out.resize(start + n, 0.0);
                    crate::quant::decode_blocks(t.dtype, data, &mut out[start..]);
                }
            }
        }
        Ok(out)
    }
}

/// The header bytes `[0, header_len)` (validated by the parse that produced `view`).
fn header_copy(storage: &Storage, view: &FileView) -> Box<[u8]> {
    let bytes = storage.bytes();
    bytes[..(view.header_len as usize).min(bytes.len())].into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_file_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<ModelFile>();
    }
}
