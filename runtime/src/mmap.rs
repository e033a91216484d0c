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

    /// Tells the OS it may drop the resident pages of bytes `[offset, offset + len)` of the
    /// mapping (`MADV_DONTNEED`); later reads fault the same file contents back in. `offset`
    /// must be a multiple of the OS page size (the range is clamped to the mapping). Returns
    /// the bytes advised: 0 for an empty range, and always 0 on non-unix targets.
    pub(crate) fn release_range(&self, offset: usize, len: usize) -> std::io::Result<u64> {
        let end = offset.saturating_add(len).min(self.map.len());
        if offset >= end {
            return Ok(0);
        }
        #[cfg(unix)]
        {
            // SAFETY: `unchecked_advise_range` is unsafe because some advice values change
            // what memory reads return. This mapping is a private (`MAP_PRIVATE`), read-only
            // (`PROT_READ`) file mapping that is never written, so none of its pages is
            // anonymous (copy-on-write): `MADV_DONTNEED` only unmaps clean pages backed by the
            // page cache, and the next read re-faults the same, unchanged file contents. No
            // Rust reference into the mapping can observe a change (the data is immutable file
            // content, and the concurrent-modification caveat of `map` is unaffected). The
            // range lies inside the mapping (clamped above) and `offset` is page-aligned by
            // the caller's contract (memmap2 would otherwise round it down, which is still
            // sound, only releasing a little more).
            unsafe { self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, end - offset)? };
            Ok((end - offset) as u64)
        }
        #[cfg(not(unix))]
        {
            Ok(0)
        }
    }
}
