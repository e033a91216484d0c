//! The one place the runtime maps a file into memory. Everything else works on `&[u8]`.

use std::fs::File;

/// A read-only memory map of a whole file.
#[derive(Debug)]
pub(crate) struct MappedFile {
    map: memmap2::Mmap,
}

impl MappedFile {
    /// Maps `file` read-only. A zero-length file yields an empty mapping.
    pub(crate) fn map(file: &File) -> std::io::Result<MappedFile> {
        // SAFETY: `Mmap::map` is unsafe because the mapped bytes can change (or, if the file is
        // truncated, disappear) while the mapping is alive if another process modifies the
        // file; Rust's `&[u8]` assumes they do not. The mapping is read-only (`PROT_READ`,
        // private to us) and the runtime treats its contents as untrusted input: the header is
        // parsed into an owned `FileView` with every offset checked against the mapped
        // length, the data is only ever read as plain bytes (no pointers, enums or other
        // types with invalid bit patterns are read from it), and `verify` checks every byte
        // against its checksum. Concurrent in-place modification of a model file is not
        // supported: appending levels or cutting a file is done by writing a new file (or
        // after closing it) and re-opening, which maps the new length.
        let map = unsafe { memmap2::MmapOptions::new().map(file)? };
        Ok(MappedFile { map })
    }

    /// The mapped bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.map
    }
}
