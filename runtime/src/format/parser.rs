//! Parsing and validating a `.matf` header from a byte slice, and verifying the data.
//!
//! No `unsafe`, no panics on any input, every offset computed with checked arithmetic and
//! checked against the input before it is used. The numbered comments (`[R1]`...) refer to the
//! reader invariants in `docs/format.md`.

use std::collections::HashMap;

use serde::Serialize;

use super::error::FormatError;
use super::layout::{
    align_up, blob_id, check_block_shape, check_shape, expected_row_ranges, required_tensor_specs, BlobInfo, DType,
    Segment, TensorInfo, BLOB_CODE, BLOB_PREFIX, HEADER_CRC_OFFSET, MAGIC, MAX_ALIGNMENT_LOG2, MAX_BLOB_LEN,
    MAX_HEADER_LEN, MAX_LEVELS, MAX_NAME_LEN, MAX_NDIM, MAX_TENSORS, MIN_ALIGNMENT_LOG2, PREAMBLE_LEN,
    SEGMENT_RECORD_LEN, TOKENIZER_JSON_BLOB, VERSION,
};
use super::meta::Metadata;

/// The validated description of a `.matf` file: everything in its header, plus how many levels
/// the (possibly cut) file actually contains. Built by [`FileView::parse`] (or by
/// [`plan_layout`](super::plan_layout) before a file is written).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FileView {
    /// Format version (1).
    pub version: u32,
    /// Alignment of every segment offset, in bytes (a power of two, 4 KiB to 16 MiB).
    pub alignment: u64,
    /// Bytes `[0, header_len)` are the header.
    pub header_len: u64,
    /// The decoded, validated metadata.
    pub metadata: Metadata,
    /// The tensors in table order (blob records excluded).
    pub tensors: Vec<TensorInfo>,
    /// The blob records (`blob.*`: the stored tokenizer) in table order; empty in files
    /// without any.
    pub blobs: Vec<BlobInfo>,
    /// `level_ends[j]`: offset one past the last byte of level `j`, for every level in the
    /// header (including levels this cut file does not contain).
    pub level_ends: Vec<u64>,
    /// Levels fully present in this file: `j + 1` when the file length is `level_ends[j]`.
    pub available_levels: usize,
    /// Length of the file (or of the byte slice) that was parsed.
    pub file_len: u64,
    /// Name -> index into `tensors`.
    #[serde(skip)]
    index: HashMap<String, usize>,
    /// Every segment (of tensors and blobs), sorted by offset.
    #[serde(skip)]
    by_offset: Vec<SegRef>,
}

/// One segment of a file: segment `.1` of tensor `.0`, or the segment of a blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SegRef {
    /// `(tensor index, segment index)`.
    Tensor(usize, usize),
    /// Blob index.
    Blob(usize),
}

impl SegRef {
    fn segment<'a>(self, tensors: &'a [TensorInfo], blobs: &'a [BlobInfo]) -> &'a Segment {
        match self {
            SegRef::Tensor(t, s) => &tensors[t].segments[s],
            SegRef::Blob(b) => &blobs[b].segment,
        }
    }

    fn name(self, tensors: &[TensorInfo], blobs: &[BlobInfo]) -> String {
        match self {
            SegRef::Tensor(t, _) => tensors[t].name.clone(),
            SegRef::Blob(b) => format!("{BLOB_PREFIX}{}", blobs[b].id),
        }
    }
}

/// Little-endian reads from a byte slice that fail instead of panicking.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let out = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2)?.try_into().ok().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_le_bytes)
    }
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

/// CRC-32 of `header` with the `header_crc32` field taken as zero. `header` must be at least
/// [`PREAMBLE_LEN`] bytes (callers check).
pub(crate) fn header_crc(header: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(header.get(..HEADER_CRC_OFFSET).unwrap_or(&[]));
    h.update(&[0u8; 4]);
    h.update(header.get(HEADER_CRC_OFFSET + 4..).unwrap_or(&[]));
    h.finalize()
}

/// Checks that name, shape and presence of every tensor match the architecture, one tensor at
/// a time. Used by the reader (in table order, so the first bad record is reported) and by the
/// writer.
pub(crate) struct TensorSetChecker {
    required: Vec<(String, Vec<u64>)>,
    position: HashMap<String, usize>,
    seen: Vec<bool>,
}

impl TensorSetChecker {
    /// `meta` must be validated.
    pub(crate) fn new(meta: &Metadata) -> Self {
        let required: Vec<(String, Vec<u64>)> =
            required_tensor_specs(meta, DType::F32).into_iter().map(|s| (s.name, s.shape)).collect();
        let position = required.iter().enumerate().map(|(i, (n, _))| (n.clone(), i)).collect();
        let seen = vec![false; required.len()];
        TensorSetChecker { required, position, seen }
    }

    /// [R14] the name is part of the architecture and appears once.
    pub(crate) fn check_name(&mut self, name: &str) -> Result<usize, FormatError> {
        let Some(&i) = self.position.get(name) else {
            return Err(FormatError::UnexpectedTensor { name: name.to_string() });
        };
        if std::mem::replace(&mut self.seen[i], true) {
            return Err(FormatError::DuplicateTensor { name: name.to_string() });
        }
        Ok(i)
    }

    /// [R15] the shape is exactly the one the architecture requires.
    pub(crate) fn check_shape(&self, i: usize, shape: &[u64]) -> Result<(), FormatError> {
        let (name, want) = &self.required[i];
        if shape != want.as_slice() {
            return Err(FormatError::BadShape {
                tensor: name.clone(),
                reason: format!("expected {want:?} for this architecture, found {shape:?}"),
            });
        }
        Ok(())
    }

    /// [R14] every required tensor was seen.
    pub(crate) fn finish(&self) -> Result<(), FormatError> {
        match self.seen.iter().position(|s| !s) {
            Some(i) => Err(FormatError::MissingTensor { name: self.required[i].0.clone() }),
            None => Ok(()),
        }
    }
}

/// Start of level `j`'s data region (after alignment padding).
fn region_start(header_len: u64, level_ends: &[u64], j: usize, alignment: u64) -> Option<u64> {
    let prev = if j == 0 { header_len } else { *level_ends.get(j - 1)? };
    align_up(prev, alignment)
}

/// Checks segment positions and row coverage of one tensor and that no two segments overlap;
/// returns the segments sorted by offset. Shared by the reader and the writer's planner.
pub(crate) fn check_placement(
    tensors: &[TensorInfo],
    blobs: &[BlobInfo],
    metadata: &Metadata,
    header_len: u64,
    level_ends: &[u64],
    alignment: u64,
) -> Result<Vec<SegRef>, FormatError> {
    let mut all = Vec::new();
    for (ti, t) in tensors.iter().enumerate() {
        let expected = expected_row_ranges(metadata, &t.name, t.rows());
        // [R16] one segment per level for nested tensors, one level-0 segment otherwise.
        if t.segments.len() != expected.len() {
            return Err(FormatError::SegmentCount {
                tensor: t.name.clone(),
                expected: expected.len() as u64,
                found: t.segments.len() as u64,
            });
        }
        for (si, (seg, &(level, start, end))) in t.segments.iter().zip(&expected).enumerate() {
            // [R17] segment j holds rows [w(j-1), w(j)) at level j.
            if seg.level != level || seg.row_start != start || seg.row_end != end {
                return Err(FormatError::SegmentRows {
                    tensor: t.name.clone(),
                    index: si,
                    level: seg.level,
                    row_start: seg.row_start,
                    row_end: seg.row_end,
                    expected_level: level,
                    expected_start: start,
                    expected_end: end,
                });
            }
            // [R18] byte_len matches rows, shape and dtype.
            let expected_len = (end - start).saturating_mul(t.row_bytes());
            if seg.byte_len != expected_len {
                return Err(FormatError::LengthMismatch {
                    tensor: t.name.clone(),
                    expected: expected_len,
                    found: seg.byte_len,
                });
            }
            check_position(&t.name, seg, header_len, level_ends, alignment)?;
            all.push(SegRef::Tensor(ti, si));
        }
    }
    for (bi, b) in blobs.iter().enumerate() {
        // [R13b] a blob is one level-0 segment of byte_len bytes (checked when parsed).
        check_position(&format!("{BLOB_PREFIX}{}", b.id), &b.segment, header_len, level_ends, alignment)?;
        all.push(SegRef::Blob(bi));
    }
    // [R21] no two segments share a byte.
    all.sort_by_key(|r| r.segment(tensors, blobs).offset);
    for w in all.windows(2) {
        let (sa, sb) = (w[0].segment(tensors, blobs), w[1].segment(tensors, blobs));
        if sa.end() > sb.offset {
            return Err(FormatError::Overlap {
                a: format!("{}[level {}]", w[0].name(tensors, blobs), sa.level),
                b: format!("{}[level {}]", w[1].name(tensors, blobs), sb.level),
                offset: sb.offset,
            });
        }
    }
    Ok(all)
}

/// [R19] the segment is aligned and [R20] lies inside its level's data region.
fn check_position(
    name: &str,
    seg: &Segment,
    header_len: u64,
    level_ends: &[u64],
    alignment: u64,
) -> Result<(), FormatError> {
    if !seg.offset.is_multiple_of(alignment) {
        return Err(FormatError::Misaligned { tensor: name.to_string(), offset: seg.offset, alignment });
    }
    let lvl = seg.level as usize;
    let rstart = region_start(header_len, level_ends, lvl, alignment).unwrap_or(u64::MAX);
    let rend = level_ends.get(lvl).copied().unwrap_or(0);
    let inside = seg.offset >= rstart && seg.offset.checked_add(seg.byte_len).is_some_and(|e| e <= rend);
    if !inside {
        return Err(FormatError::SegmentOutOfBounds {
            tensor: name.to_string(),
            level: seg.level,
            offset: seg.offset,
            byte_len: seg.byte_len,
            region_start: rstart,
            region_end: rend,
        });
    }
    Ok(())
}

impl FileView {
    /// Parses and validates the header of a whole file, or of a file cut at a level boundary.
    /// O(header): reads only `[0, header_len)`; segment checksums are checked by
    /// [`verify`](Self::verify).
    pub fn parse(bytes: &[u8]) -> Result<FileView, FormatError> {
        Self::parse_header(bytes, bytes.len() as u64)
    }

    /// Like [`parse`](Self::parse) when only the first bytes of the file are in memory and
    /// the file's total length is `file_len`. `header_bytes` must hold at least the header.
    pub fn parse_header(header_bytes: &[u8], file_len: u64) -> Result<FileView, FormatError> {
        // Bytes past file_len do not exist, whatever the buffer holds.
        let have = (header_bytes.len() as u64).min(file_len);
        let bytes = &header_bytes[..have as usize];

        // [R1] magic.
        let mut found = [0u8; 4];
        let n = bytes.len().min(4);
        found[..n].copy_from_slice(&bytes[..n]);
        if found[..n] != MAGIC[..n] {
            return Err(FormatError::BadMagic { found });
        }
        if bytes.len() < PREAMBLE_LEN {
            return Err(FormatError::Truncated { needed: PREAMBLE_LEN as u64, len: have, what: "preamble" });
        }

        // [R2] version, [R3] alignment, [R4] counts, [R5] flags and reserved bytes.
        let version = le_u32(bytes, 4);
        if version != VERSION {
            return Err(FormatError::UnsupportedVersion { found: version, supported: VERSION });
        }
        let alignment_log2 = le_u32(bytes, 8);
        if !(MIN_ALIGNMENT_LOG2..=MAX_ALIGNMENT_LOG2).contains(&alignment_log2) {
            return Err(FormatError::BadAlignment { log2: alignment_log2 });
        }
        let alignment = 1u64 << alignment_log2;
        let n_levels = le_u32(bytes, 12) as usize;
        if !(1..=MAX_LEVELS).contains(&n_levels) {
            return Err(FormatError::BadCount {
                what: "n_levels",
                found: n_levels as u64,
                min: 1,
                max: MAX_LEVELS as u64,
            });
        }
        let n_tensors = le_u32(bytes, 16) as usize;
        if !(1..=MAX_TENSORS).contains(&n_tensors) {
            return Err(FormatError::BadCount {
                what: "n_tensors",
                found: n_tensors as u64,
                min: 1,
                max: MAX_TENSORS as u64,
            });
        }
        let flags = le_u32(bytes, 20);
        if flags != 0 {
            return Err(FormatError::UnknownFlags { flags });
        }
        if let Some(pos) = bytes[52..PREAMBLE_LEN].iter().position(|&b| b != 0) {
            return Err(FormatError::ReservedNonZero { what: "preamble bytes 52..64", offset: 52 + pos as u64 });
        }

        // [R6] header length.
        let header_len = le_u64(bytes, 24);
        let metadata_len = le_u64(bytes, 32);
        let table_len = le_u64(bytes, 40);
        let level_table_len = 8 * n_levels as u64;
        let computed = (PREAMBLE_LEN as u64 + level_table_len)
            .checked_add(metadata_len)
            .and_then(|v| v.checked_add(table_len))
            .unwrap_or(u64::MAX);
        if header_len != computed {
            return Err(FormatError::HeaderLength { stated: header_len, computed });
        }
        if header_len > MAX_HEADER_LEN {
            return Err(FormatError::BadCount {
                what: "header_len",
                found: header_len,
                min: PREAMBLE_LEN as u64,
                max: MAX_HEADER_LEN,
            });
        }
        if have < header_len {
            return Err(FormatError::Truncated { needed: header_len, len: have, what: "header" });
        }
        let header = &bytes[..header_len as usize];

        // [R7] header checksum.
        let stored = le_u32(header, HEADER_CRC_OFFSET);
        let computed = header_crc(header);
        if stored != computed {
            return Err(FormatError::HeaderChecksum { stored, computed });
        }

        // [R8] level table.
        let mut level_ends = Vec::with_capacity(n_levels);
        for j in 0..n_levels {
            let end = le_u64(header, PREAMBLE_LEN + 8 * j);
            let prev = if j == 0 { header_len } else { level_ends[j - 1] };
            if end <= prev {
                return Err(FormatError::BadLevelTable {
                    reason: format!(
                        "level {j} ends at {end}, not after {} ({prev})",
                        if j == 0 { "the header" } else { "the previous level" }
                    ),
                });
            }
            match align_up(prev, alignment) {
                Some(start) if start < end => {}
                _ => {
                    return Err(FormatError::BadLevelTable {
                        reason: format!(
                            "level {j} (bytes {prev}..{end}) has no room for data after aligning to {alignment}"
                        ),
                    })
                }
            }
            level_ends.push(end);
        }

        // [R9] the file ends exactly at a level end.
        let last = level_ends[n_levels - 1];
        if file_len > last {
            return Err(FormatError::TrailingBytes { expected: last, len: file_len });
        }
        let available_levels = match level_ends.iter().position(|&e| e >= file_len) {
            Some(j) if level_ends[j] == file_len => j + 1,
            Some(0) => return Err(FormatError::Truncated { needed: level_ends[0], len: file_len, what: "level 0" }),
            Some(j) => {
                return Err(FormatError::TruncatedInsideLevel {
                    level: j,
                    level_start: level_ends[j - 1],
                    level_end: level_ends[j],
                    len: file_len,
                })
            }
            None => return Err(FormatError::TrailingBytes { expected: last, len: file_len }),
        };

        // [R10] metadata: UTF-8 JSON, [R11] consistent, [R12] same level count as the header.
        let meta_start = PREAMBLE_LEN + level_table_len as usize;
        let meta_end = meta_start + metadata_len as usize;
        let meta_bytes = &header[meta_start..meta_end];
        let meta_text = std::str::from_utf8(meta_bytes)
            .map_err(|e| FormatError::MetadataJson { reason: format!("not UTF-8: {e}") })?;
        let metadata: Metadata =
            serde_json::from_str(meta_text).map_err(|e| FormatError::MetadataJson { reason: e.to_string() })?;
        metadata.validate()?;
        if metadata.n_levels() != n_levels {
            return Err(FormatError::BadMetadata {
                reason: format!("metadata has {} levels but the header has {n_levels}", metadata.n_levels()),
            });
        }

        // [R13] tensor table records.
        let mut cur = Cursor { bytes: &header[meta_end..], pos: 0 };
        let mut checker = TensorSetChecker::new(&metadata);
        let mut tensors = Vec::with_capacity(n_tensors.min(1024));
        let mut blobs: Vec<BlobInfo> = Vec::new();
        for index in 0..n_tensors {
            match parse_record(&mut cur, index, meta_end as u64, n_levels, &mut checker)? {
                Record::Tensor(t) => tensors.push(t),
                Record::Blob(b) => {
                    if blobs.iter().any(|o| o.id == b.id) {
                        return Err(FormatError::DuplicateTensor { name: format!("{BLOB_PREFIX}{}", b.id) });
                    }
                    blobs.push(b)
                }
            }
        }
        if cur.pos != cur.bytes.len() {
            return Err(FormatError::BadTensorTable {
                index: n_tensors,
                reason: format!("{} bytes left after the last record", cur.bytes.len() - cur.pos),
            });
        }
        checker.finish()?;
        check_blob_set(&metadata, &blobs)?;

        // [R16]-[R21] segment placement.
        let by_offset = check_placement(&tensors, &blobs, &metadata, header_len, &level_ends, alignment)?;
        Ok(FileView::assemble(
            alignment,
            header_len,
            metadata,
            tensors,
            blobs,
            level_ends,
            available_levels,
            file_len,
            by_offset,
        ))
    }

    /// Builds a view from validated parts.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn assemble(
        alignment: u64,
        header_len: u64,
        metadata: Metadata,
        tensors: Vec<TensorInfo>,
        blobs: Vec<BlobInfo>,
        level_ends: Vec<u64>,
        available_levels: usize,
        file_len: u64,
        by_offset: Vec<SegRef>,
    ) -> FileView {
        let index = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        FileView {
            version: VERSION,
            alignment,
            header_len,
            metadata,
            tensors,
            blobs,
            level_ends,
            available_levels,
            file_len,
            index,
            by_offset,
        }
    }

    /// The tensor called `name`, or [`FormatError::MissingTensor`].
    pub fn tensor(&self, name: &str) -> Result<&TensorInfo, FormatError> {
        self.index
            .get(name)
            .and_then(|&i| self.tensors.get(i))
            .ok_or_else(|| FormatError::MissingTensor { name: name.to_string() })
    }

    /// The blob record with this id (`"tokenizer_json"`), if the file has one.
    pub fn blob(&self, id: &str) -> Option<&BlobInfo> {
        self.blobs.iter().find(|b| b.id == id)
    }

    /// The content of blob `id` inside `bytes` (the file this view was parsed from), its CRC-32
    /// checked (O(blob length)); `Ok(None)` when the file has no such blob.
    pub fn blob_bytes<'a>(&self, bytes: &'a [u8], id: &str) -> Result<Option<&'a [u8]>, FormatError> {
        let Some(b) = self.blob(id) else { return Ok(None) };
        let data = self.segment_bytes(bytes, &b.segment)?;
        let computed = crc32fast::hash(data);
        if computed != b.segment.crc32 {
            return Err(FormatError::SegmentChecksum {
                tensor: format!("{BLOB_PREFIX}{id}"),
                level: 0,
                offset: b.segment.offset,
                stored: b.segment.crc32,
                computed,
            });
        }
        Ok(Some(data))
    }

    /// The bytes of one segment inside `bytes` (the file this view was parsed from). Errors
    /// if the segment's level is not in this file or the slice is too short; never panics.
    pub fn segment_bytes<'a>(&self, bytes: &'a [u8], seg: &Segment) -> Result<&'a [u8], FormatError> {
        if seg.level as usize >= self.available_levels {
            return Err(FormatError::LevelNotAvailable { level: seg.level as usize, available: self.available_levels });
        }
        let range = seg
            .offset
            .checked_add(seg.byte_len)
            .and_then(|end| Some(usize::try_from(seg.offset).ok()?..usize::try_from(end).ok()?));
        range.and_then(|r| bytes.get(r)).ok_or_else(|| FormatError::SegmentOutOfBounds {
            tensor: "<segment>".to_string(),
            level: seg.level,
            offset: seg.offset,
            byte_len: seg.byte_len,
            region_start: 0,
            region_end: bytes.len() as u64,
        })
    }

    /// Checks the header checksum again, the CRC of every segment of every available level,
    /// and that every byte outside the segments (alignment padding) is zero. Together with
    /// the checks of `parse`, any changed byte anywhere in the file is detected. Reads the
    /// whole file; reports the first problem by offset.
    pub fn verify(&self, bytes: &[u8]) -> Result<(), FormatError> {
        if bytes.len() as u64 != self.file_len {
            return Err(FormatError::FileLengthChanged { parsed: self.file_len, now: bytes.len() as u64 });
        }
        let header_len = usize::try_from(self.header_len).unwrap_or(usize::MAX);
        let Some(header) = bytes.get(..header_len).filter(|h| h.len() >= PREAMBLE_LEN) else {
            return Err(FormatError::Truncated { needed: self.header_len, len: bytes.len() as u64, what: "header" });
        };
        let stored = le_u32(header, HEADER_CRC_OFFSET);
        let computed = header_crc(header);
        if stored != computed {
            return Err(FormatError::HeaderChecksum { stored, computed });
        }
        self.check_segments(bytes, self.header_len..self.file_len, |level| level < self.available_levels)
    }

    /// CRC-checks, in file order, every segment whose level `include` accepts, and checks that
    /// the other bytes of `range` (padding between those segments) are zero.
    fn check_segments(
        &self,
        bytes: &[u8],
        range: std::ops::Range<u64>,
        include: impl Fn(usize) -> bool,
    ) -> Result<(), FormatError> {
        let mut pos = range.start;
        for &r in &self.by_offset {
            let seg = r.segment(&self.tensors, &self.blobs);
            if !include(seg.level as usize) {
                continue;
            }
            check_zero(bytes, pos, seg.offset)?;
            let data = self.segment_bytes(bytes, seg)?;
            let computed = crc32fast::hash(data);
            if computed != seg.crc32 {
                return Err(FormatError::SegmentChecksum {
                    tensor: r.name(&self.tensors, &self.blobs),
                    level: seg.level,
                    offset: seg.offset,
                    stored: seg.crc32,
                    computed,
                });
            }
            pos = seg.end();
        }
        check_zero(bytes, pos, range.end)
    }

    /// Checks only the bytes of levels `levels` (each must be available): the CRC of every
    /// segment of those levels and that every other byte of their byte ranges (alignment
    /// padding) is zero. Reads nothing outside `[level_range(levels.start).start,
    /// level_ends[levels.end - 1])`; the header is not checked. Use it after appending levels
    /// to a file whose lower levels were already checked. Returns the bytes checked (0 for an
    /// empty range); reports the first problem by offset.
    pub fn verify_levels(&self, bytes: &[u8], levels: std::ops::Range<usize>) -> Result<u64, FormatError> {
        if levels.is_empty() {
            return Ok(0);
        }
        if levels.end > self.available_levels {
            return Err(FormatError::LevelNotAvailable { level: levels.end - 1, available: self.available_levels });
        }
        let (Some(first), Some(last)) = (self.level_range(levels.start), self.level_range(levels.end - 1)) else {
            return Err(FormatError::LevelNotAvailable { level: levels.end - 1, available: self.available_levels });
        };
        let (start, end) = (first.start, last.end);
        if (bytes.len() as u64) < end {
            return Err(FormatError::Truncated { needed: end, len: bytes.len() as u64, what: "level" });
        }
        self.check_segments(bytes, start..end, |level| levels.contains(&level))?;
        Ok(end - start)
    }

    /// Neuron counts per layer at level `level` (`metadata.ffn_widths[i][level]`); empty if
    /// `level` is not a level of this file.
    pub fn level_widths(&self, level: usize) -> Vec<u32> {
        if level >= self.level_ends.len() {
            return Vec::new();
        }
        self.metadata.ffn_widths.iter().filter_map(|w| w.get(level).copied()).collect()
    }

    /// Number of levels the header describes (present or not).
    pub fn n_levels(&self) -> usize {
        self.level_ends.len()
    }

    /// Byte range `[start, end)` of level `j`: from the end of the previous level (or of the
    /// header) to `level_ends[j]`, padding included. A file cut at `end` holds levels `0..=j`.
    pub fn level_range(&self, j: usize) -> Option<std::ops::Range<u64>> {
        let end = *self.level_ends.get(j)?;
        let start = if j == 0 { self.header_len } else { self.level_ends[j - 1] };
        Some(start..end)
    }
}

/// [R24] bytes `[from, to)` are zero.
fn check_zero(bytes: &[u8], from: u64, to: u64) -> Result<(), FormatError> {
    if from >= to {
        return Ok(());
    }
    let (Ok(f), Ok(t)) = (usize::try_from(from), usize::try_from(to)) else {
        return Err(FormatError::NonZeroPadding { offset: from });
    };
    match bytes.get(f..t) {
        Some(s) => match s.iter().position(|&b| b != 0) {
            Some(p) => Err(FormatError::NonZeroPadding { offset: from + p as u64 }),
            None => Ok(()),
        },
        None => Err(FormatError::NonZeroPadding { offset: from }),
    }
}

/// A record of the tensor table.
enum Record {
    Tensor(TensorInfo),
    Blob(BlobInfo),
}

/// [R14b] the blobs the metadata relies on are present: `tokenizer.kind == "huggingface"`
/// needs `blob.tokenizer_json`.
pub(crate) fn check_blob_set(metadata: &Metadata, blobs: &[BlobInfo]) -> Result<(), FormatError> {
    if metadata.tokenizer.kind == super::meta::HF_TOKENIZER_KIND && !blobs.iter().any(|b| b.id == TOKENIZER_JSON_BLOB) {
        return Err(FormatError::MissingTensor { name: format!("{BLOB_PREFIX}{TOKENIZER_JSON_BLOB}") });
    }
    Ok(())
}

/// Parses tensor record `index`; `base` is the absolute offset of the table.
fn parse_record(
    cur: &mut Cursor<'_>,
    index: usize,
    base: u64,
    n_levels: usize,
    checker: &mut TensorSetChecker,
) -> Result<Record, FormatError> {
    let short = |what: &str| FormatError::BadTensorTable {
        index,
        reason: format!("record overruns the table while reading {what}"),
    };
    let name_len = cur.u16().ok_or_else(|| short("name_len"))? as usize;
    if name_len == 0 || name_len > MAX_NAME_LEN {
        return Err(FormatError::BadTensorName {
            index,
            reason: format!("name_len {name_len}, allowed 1..={MAX_NAME_LEN}"),
        });
    }
    let name_bytes = cur.take(name_len).ok_or_else(|| short("the name"))?;
    let name = std::str::from_utf8(name_bytes)
        .map_err(|e| FormatError::BadTensorName { index, reason: format!("not UTF-8: {e}") })?
        .to_string();
    if name.starts_with(BLOB_PREFIX) {
        return parse_blob_record(cur, name, base, short).map(Record::Blob);
    }
    let req = checker.check_name(&name)?;

    let code = cur.u8().ok_or_else(|| short("dtype"))?;
    if code == BLOB_CODE {
        return Err(FormatError::BadBlob {
            name,
            reason: format!("code {BLOB_CODE} (bytes) is only for blob.* records"),
        });
    }
    let Some(dtype) = DType::from_code(code) else {
        return Err(FormatError::UnknownDType { code, tensor: name });
    };
    let ndim = cur.u8().ok_or_else(|| short("ndim"))? as usize;
    if ndim == 0 || ndim > MAX_NDIM {
        return Err(FormatError::BadShape { tensor: name, reason: format!("ndim {ndim}, allowed 1..={MAX_NDIM}") });
    }
    let reserved_at = base + cur.pos as u64;
    if cur.u16().ok_or_else(|| short("reserved"))? != 0 {
        return Err(FormatError::ReservedNonZero { what: "tensor record reserved u16", offset: reserved_at });
    }
    let mut shape = Vec::with_capacity(ndim);
    for _ in 0..ndim {
        shape.push(cur.u64().ok_or_else(|| short("the shape"))?);
    }
    let (_, row_elems) = check_shape(&name, &shape)?;
    // [R13c] a quantised row is a whole number of blocks.
    check_block_shape(&name, dtype, row_elems)?;
    checker.check_shape(req, &shape)?;

    let n_segments = cur.u32().ok_or_else(|| short("n_segments"))? as usize;
    if n_segments == 0 || n_segments > n_levels {
        let expected = if super::layout::nested_layer(&name).is_some() { n_levels as u64 } else { 1 };
        return Err(FormatError::SegmentCount { tensor: name, expected, found: n_segments as u64 });
    }
    let mut segments = Vec::with_capacity(n_segments);
    for _ in 0..n_segments {
        let rec_at = base + cur.pos as u64;
        let rec = cur.take(SEGMENT_RECORD_LEN).ok_or_else(|| short("a segment"))?;
        for at in [4, 44] {
            if le_u32(rec, at) != 0 {
                return Err(FormatError::ReservedNonZero {
                    what: "segment record reserved u32",
                    offset: rec_at + at as u64,
                });
            }
        }
        segments.push(Segment {
            level: le_u32(rec, 0),
            row_start: le_u64(rec, 8),
            row_end: le_u64(rec, 16),
            offset: le_u64(rec, 24),
            byte_len: le_u64(rec, 32),
            crc32: le_u32(rec, 40),
        });
    }
    Ok(Record::Tensor(TensorInfo { name, dtype, shape, segments }))
}

/// [R13b] the rest of a blob record named `name` (`blob.` + id): code 4, one dimension of
/// 1 to 2^30 bytes, one level-0 segment of rows `[0, n)` and `n` bytes.
fn parse_blob_record(
    cur: &mut Cursor<'_>,
    name: String,
    base: u64,
    short: impl Fn(&str) -> FormatError,
) -> Result<BlobInfo, FormatError> {
    let bad = |name: &str, reason: String| FormatError::BadBlob { name: name.to_string(), reason };
    let Some(id) = blob_id(&name).map(str::to_string) else {
        return Err(bad(&name, "the id after \"blob.\" must be 1 to 64 of a-z, 0-9 and _".to_string()));
    };
    let code = cur.u8().ok_or_else(|| short("dtype"))?;
    if code != BLOB_CODE {
        return Err(bad(&name, format!("element code {code}, expected {BLOB_CODE} (bytes)")));
    }
    let ndim = cur.u8().ok_or_else(|| short("ndim"))?;
    let reserved_at = base + cur.pos as u64;
    if cur.u16().ok_or_else(|| short("reserved"))? != 0 {
        return Err(FormatError::ReservedNonZero { what: "tensor record reserved u16", offset: reserved_at });
    }
    if ndim != 1 {
        return Err(bad(&name, format!("{ndim} dimensions, expected 1")));
    }
    let n = cur.u64().ok_or_else(|| short("the shape"))?;
    if n == 0 || n > MAX_BLOB_LEN {
        return Err(bad(&name, format!("{n} bytes, allowed 1..={MAX_BLOB_LEN}")));
    }
    let n_segments = cur.u32().ok_or_else(|| short("n_segments"))?;
    if n_segments != 1 {
        return Err(FormatError::SegmentCount { tensor: name, expected: 1, found: u64::from(n_segments) });
    }
    let rec_at = base + cur.pos as u64;
    let rec = cur.take(SEGMENT_RECORD_LEN).ok_or_else(|| short("a segment"))?;
    for at in [4, 44] {
        if le_u32(rec, at) != 0 {
            return Err(FormatError::ReservedNonZero {
                what: "segment record reserved u32",
                offset: rec_at + at as u64,
            });
        }
    }
    let segment = Segment {
        level: le_u32(rec, 0),
        row_start: le_u64(rec, 8),
        row_end: le_u64(rec, 16),
        offset: le_u64(rec, 24),
        byte_len: le_u64(rec, 32),
        crc32: le_u32(rec, 40),
    };
    if segment.level != 0 || segment.row_start != 0 || segment.row_end != n {
        return Err(FormatError::SegmentRows {
            tensor: name,
            index: 0,
            level: segment.level,
            row_start: segment.row_start,
            row_end: segment.row_end,
            expected_level: 0,
            expected_start: 0,
            expected_end: n,
        });
    }
    if segment.byte_len != n {
        return Err(FormatError::LengthMismatch { tensor: name, expected: n, found: segment.byte_len });
    }
    Ok(BlobInfo { id, segment })
}
