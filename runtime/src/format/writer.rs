//! Writing a `.matf` file: the layout is computed from the tensor specs first
//! ([`plan_layout`]), then the data is streamed tensor by tensor, row range by row range.

use std::io::Write;
use std::ops::Range;

use super::error::FormatError;
use super::layout::{
    align_up, blob_id, check_block_shape, check_shape, expected_row_ranges, BlobInfo, BlobSpec, Segment, TensorInfo,
    TensorSpec, BLOB_CODE, BLOB_PREFIX, DEFAULT_ALIGNMENT_LOG2, HEADER_CRC_OFFSET, MAGIC, MAX_ALIGNMENT_LOG2,
    MAX_BLOB_LEN, MAX_HEADER_LEN, MAX_TENSORS, MIN_ALIGNMENT_LOG2, PREAMBLE_LEN, SEGMENT_RECORD_LEN, VERSION,
};
use super::meta::Metadata;
use super::parser::{check_blob_set, check_placement, header_crc, FileView, SegRef, TensorSetChecker};

/// Largest row range handed to `fill` in one call.
const CHUNK_BYTES: u64 = 4 << 20;

/// Computes the layout of the file that [`write_file`] would write for these tensors: the
/// [`FileView`] it will parse to, with every `crc32` field 0. Validates the metadata and the
/// tensor set (names, shapes, presence) with the same code as the reader. Tensors are laid out
/// in the order given; [`required_tensor_specs`](super::required_tensor_specs) gives the
/// canonical order.
pub fn plan_layout(metadata: &Metadata, tensors: &[TensorSpec]) -> Result<FileView, FormatError> {
    plan_layout_with_alignment(metadata, tensors, DEFAULT_ALIGNMENT_LOG2)
}

/// [`plan_layout`] with an explicit `alignment_log2` (12..=24).
pub fn plan_layout_with_alignment(
    metadata: &Metadata,
    tensors: &[TensorSpec],
    alignment_log2: u32,
) -> Result<FileView, FormatError> {
    plan(metadata, tensors, &[], alignment_log2).map(|(view, _)| view)
}

/// [`plan_layout_with_alignment`] for a file that also stores blobs (the tokenizer's JSON):
/// they are placed at the end of level 0, after its tensor segments, in the order given (their
/// CRC fields are 0 here).
pub fn plan_layout_with_blobs(
    metadata: &Metadata,
    tensors: &[TensorSpec],
    blobs: &[BlobSpec<'_>],
    alignment_log2: u32,
) -> Result<FileView, FormatError> {
    plan(metadata, tensors, blobs, alignment_log2).map(|(view, _)| view)
}

/// Checks the blobs to be written: valid unique ids, 1 byte to 1 GiB each.
fn check_blob_specs(blobs: &[BlobSpec<'_>]) -> Result<(), FormatError> {
    for (i, b) in blobs.iter().enumerate() {
        let name = format!("{BLOB_PREFIX}{}", b.id);
        if blob_id(&name).is_none() {
            let reason = "the id after \"blob.\" must be 1 to 64 of a-z, 0-9 and _".to_string();
            return Err(FormatError::BadBlob { name, reason });
        }
        if b.bytes.is_empty() || b.bytes.len() as u64 > MAX_BLOB_LEN {
            let reason = format!("{} bytes, allowed 1..={MAX_BLOB_LEN}", b.bytes.len());
            return Err(FormatError::BadBlob { name, reason });
        }
        if blobs[..i].iter().any(|o| o.id == b.id) {
            return Err(FormatError::DuplicateTensor { name });
        }
    }
    Ok(())
}

/// The layout plus the metadata JSON it was computed for.
fn plan(
    metadata: &Metadata,
    tensors: &[TensorSpec],
    blobs: &[BlobSpec<'_>],
    alignment_log2: u32,
) -> Result<(FileView, Vec<u8>), FormatError> {
    if !(MIN_ALIGNMENT_LOG2..=MAX_ALIGNMENT_LOG2).contains(&alignment_log2) {
        return Err(FormatError::BadAlignment { log2: alignment_log2 });
    }
    let alignment = 1u64 << alignment_log2;
    metadata.validate()?;
    let n_records = tensors.len().saturating_add(blobs.len());
    if tensors.is_empty() || n_records > MAX_TENSORS {
        return Err(FormatError::BadCount {
            what: "n_tensors",
            found: n_records as u64,
            min: 1,
            max: MAX_TENSORS as u64,
        });
    }
    check_blob_specs(blobs)?;
    let mut checker = TensorSetChecker::new(metadata);
    for t in tensors {
        let i = checker.check_name(&t.name)?;
        let (_, row_elems) = check_shape(&t.name, &t.shape)?;
        check_block_shape(&t.name, t.dtype, row_elems)?;
        checker.check_shape(i, &t.shape)?;
    }
    checker.finish()?;
    let mut blob_infos: Vec<BlobInfo> = blobs
        .iter()
        .map(|b| {
            let n = b.bytes.len() as u64;
            let segment = Segment { level: 0, row_start: 0, row_end: n, offset: 0, byte_len: n, crc32: 0 };
            BlobInfo { id: b.id.to_string(), segment }
        })
        .collect();
    check_blob_set(metadata, &blob_infos)?;

    let json = metadata.to_json_bytes()?;
    let n_levels = metadata.n_levels();
    let mut infos: Vec<TensorInfo> = tensors
        .iter()
        .map(|t| {
            let mut info =
                TensorInfo { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone(), segments: Vec::new() };
            let row_bytes = info.row_bytes();
            info.segments = expected_row_ranges(metadata, &t.name, info.rows())
                .into_iter()
                .map(|(level, row_start, row_end)| Segment {
                    level,
                    row_start,
                    row_end,
                    offset: 0,
                    // Shapes are at most 2^40 elements of at most 4 bytes each (block types
                    // use fewer); row_bytes is finite, checked above.
                    byte_len: (row_end - row_start) * row_bytes,
                    crc32: 0,
                })
                .collect();
            info
        })
        .collect();
    let table_len: u64 =
        infos.iter().map(record_len).sum::<u64>() + blob_infos.iter().map(blob_record_len).sum::<u64>();
    let header_len = (PREAMBLE_LEN + 8 * n_levels + json.len()) as u64 + table_len;
    if header_len > MAX_HEADER_LEN {
        return Err(FormatError::BadCount {
            what: "header_len",
            found: header_len,
            min: PREAMBLE_LEN as u64,
            max: MAX_HEADER_LEN,
        });
    }

    let overflow = || FormatError::BadLevelTable { reason: "the file would be larger than 2^64 bytes".to_string() };
    let mut level_ends = Vec::with_capacity(n_levels);
    let mut cursor = header_len;
    for level in 0..n_levels as u32 {
        let start = cursor;
        for info in &mut infos {
            if let Some(seg) = info.segments.iter_mut().find(|s| s.level == level) {
                seg.offset = align_up(cursor, alignment).ok_or_else(overflow)?;
                cursor = seg.offset.checked_add(seg.byte_len).ok_or_else(overflow)?;
            }
        }
        if level == 0 {
            for b in &mut blob_infos {
                b.segment.offset = align_up(cursor, alignment).ok_or_else(overflow)?;
                cursor = b.segment.offset.checked_add(b.segment.byte_len).ok_or_else(overflow)?;
            }
        }
        if cursor == start {
            return Err(FormatError::BadLevelTable { reason: format!("level {level} would hold no data") });
        }
        level_ends.push(cursor);
    }
    let by_offset = check_placement(&infos, &blob_infos, metadata, header_len, &level_ends, alignment)?;
    let view = FileView::assemble(
        alignment,
        header_len,
        metadata.clone(),
        infos,
        blob_infos,
        level_ends,
        n_levels,
        cursor,
        by_offset,
    );
    Ok((view, json))
}

/// Bytes of one tensor record in the table.
fn record_len(t: &TensorInfo) -> u64 {
    (2 + t.name.len() + 1 + 1 + 2 + 8 * t.shape.len() + 4 + SEGMENT_RECORD_LEN * t.segments.len()) as u64
}

/// Bytes of one blob record in the table (a one-dimensional record with one segment).
fn blob_record_len(b: &BlobInfo) -> u64 {
    (2 + BLOB_PREFIX.len() + b.id.len() + 1 + 1 + 2 + 8 + 4 + SEGMENT_RECORD_LEN) as u64
}

/// Appends one segment record.
fn encode_segment(h: &mut Vec<u8>, s: &Segment) {
    h.extend_from_slice(&s.level.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&s.row_start.to_le_bytes());
    h.extend_from_slice(&s.row_end.to_le_bytes());
    h.extend_from_slice(&s.offset.to_le_bytes());
    h.extend_from_slice(&s.byte_len.to_le_bytes());
    h.extend_from_slice(&s.crc32.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
}

/// The header bytes (preamble, level table, metadata, tensor table) of `view`, with its CRC.
/// Blob records follow the tensor records in the table.
pub(crate) fn encode_header(view: &FileView, json: &[u8]) -> Vec<u8> {
    let table_len: u64 =
        view.tensors.iter().map(record_len).sum::<u64>() + view.blobs.iter().map(blob_record_len).sum::<u64>();
    let mut h = Vec::with_capacity(view.header_len as usize);
    h.extend_from_slice(&MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&view.alignment.trailing_zeros().to_le_bytes());
    h.extend_from_slice(&(view.level_ends.len() as u32).to_le_bytes());
    h.extend_from_slice(&((view.tensors.len() + view.blobs.len()) as u32).to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes()); // flags
    h.extend_from_slice(&view.header_len.to_le_bytes());
    h.extend_from_slice(&(json.len() as u64).to_le_bytes());
    h.extend_from_slice(&table_len.to_le_bytes());
    h.extend_from_slice(&[0u8; 4]); // header_crc32, patched below
    h.extend_from_slice(&[0u8; 12]); // reserved
    for end in &view.level_ends {
        h.extend_from_slice(&end.to_le_bytes());
    }
    h.extend_from_slice(json);
    for t in &view.tensors {
        h.extend_from_slice(&(t.name.len() as u16).to_le_bytes());
        h.extend_from_slice(t.name.as_bytes());
        h.push(t.dtype.code());
        h.push(t.shape.len() as u8);
        h.extend_from_slice(&0u16.to_le_bytes());
        for d in &t.shape {
            h.extend_from_slice(&d.to_le_bytes());
        }
        h.extend_from_slice(&(t.segments.len() as u32).to_le_bytes());
        for s in &t.segments {
            encode_segment(&mut h, s);
        }
    }
    for b in &view.blobs {
        h.extend_from_slice(&((BLOB_PREFIX.len() + b.id.len()) as u16).to_le_bytes());
        h.extend_from_slice(BLOB_PREFIX.as_bytes());
        h.extend_from_slice(b.id.as_bytes());
        h.push(BLOB_CODE);
        h.push(1);
        h.extend_from_slice(&0u16.to_le_bytes());
        h.extend_from_slice(&b.segment.byte_len.to_le_bytes());
        h.extend_from_slice(&1u32.to_le_bytes());
        encode_segment(&mut h, &b.segment);
    }
    let crc = header_crc(&h);
    h[HEADER_CRC_OFFSET..HEADER_CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Row ranges of at most [`CHUNK_BYTES`] (at least one row) covering a segment.
fn chunks(seg: &Segment, row_bytes: u64) -> impl Iterator<Item = Range<u64>> {
    let step = (CHUNK_BYTES / row_bytes.max(1)).max(1);
    let (start, end) = (seg.row_start, seg.row_end);
    (0..)
        .map(move |k: u64| start.saturating_add(k.saturating_mul(step)))
        .take_while(move |&s| s < end)
        .map(move |s| s..s.saturating_add(step).min(end))
}

/// Calls `fill` for `rows` into a cleared `buf` and checks the length it produced.
fn fill_rows(
    fill: &mut impl FnMut(usize, Range<u64>, &mut Vec<u8>) -> Result<(), FormatError>,
    ti: usize,
    t: &TensorInfo,
    rows: Range<u64>,
    buf: &mut Vec<u8>,
) -> Result<(), FormatError> {
    buf.clear();
    let expected = (rows.end - rows.start) * t.row_bytes();
    fill(ti, rows, buf)?;
    if buf.len() as u64 != expected {
        return Err(FormatError::LengthMismatch { tensor: t.name.clone(), expected, found: buf.len() as u64 });
    }
    Ok(())
}

/// Writes a complete file with the default alignment (16 KiB); returns its length.
///
/// `fill(tensor_index, row_start..row_end, out)` must append exactly the bytes of those rows
/// of `tensors[tensor_index]` (row-major, little-endian, in the tensor's dtype) to `out`
/// (which is empty on entry). Row ranges never cross a segment and span at most 4 MiB (or a
/// single row, if one row is larger).
/// **`fill` is called twice for every range** — once to compute the segment checksums that
/// the header (written first) records, once to write — and must return the same bytes both
/// times ([`FormatError::FillNotDeterministic`] otherwise). Only one range is in memory at a
/// time. `progress(done, total)` is called after each range of either pass, with `total` =
/// twice the file length (both passes) and `done` reaching `total` when the file is written.
pub fn write_file<W: Write>(
    out: W,
    metadata: &Metadata,
    tensors: &[TensorSpec],
    fill: impl FnMut(usize, Range<u64>, &mut Vec<u8>) -> Result<(), FormatError>,
    progress: impl FnMut(u64, u64),
) -> Result<u64, FormatError> {
    write_file_with_alignment(out, metadata, tensors, DEFAULT_ALIGNMENT_LOG2, fill, progress)
}

/// [`write_file`] with an explicit `alignment_log2` (12..=24).
pub fn write_file_with_alignment<W: Write>(
    out: W,
    metadata: &Metadata,
    tensors: &[TensorSpec],
    alignment_log2: u32,
    fill: impl FnMut(usize, Range<u64>, &mut Vec<u8>) -> Result<(), FormatError>,
    progress: impl FnMut(u64, u64),
) -> Result<u64, FormatError> {
    write_file_with_blobs(out, metadata, tensors, &[], alignment_log2, fill, progress)
}

/// [`write_file_with_alignment`] for a file that also stores blobs (docs/format.md 5.5): each
/// blob is one CRC-checked level-0 segment after level 0's tensor segments, read only when
/// asked for ([`FileView::blob_bytes`]). A model with a Hugging Face tokenizer stores its
/// `tokenizer.json` as blob [`TOKENIZER_JSON_BLOB`](super::TOKENIZER_JSON_BLOB) with metadata
/// `tokenizer.kind == "huggingface"` (`crate::tokenizer::TokenizerAssets` sets up both).
/// With no blobs the file is byte-identical to [`write_file_with_alignment`]'s.
pub fn write_file_with_blobs<W: Write>(
    out: W,
    metadata: &Metadata,
    tensors: &[TensorSpec],
    blobs: &[BlobSpec<'_>],
    alignment_log2: u32,
    mut fill: impl FnMut(usize, Range<u64>, &mut Vec<u8>) -> Result<(), FormatError>,
    mut progress: impl FnMut(u64, u64),
) -> Result<u64, FormatError> {
    let (mut view, json) = plan(metadata, tensors, blobs, alignment_log2)?;
    let mut buf = Vec::new();

    // Progress counts both passes: `total_work` = twice the file's data.
    let total_work = view.file_len.saturating_mul(2);
    let mut done = 0u64;

    // Pass 1: checksums.
    for ti in 0..view.tensors.len() {
        for si in 0..view.tensors[ti].segments.len() {
            let t = &view.tensors[ti];
            let mut h = crc32fast::Hasher::new();
            for rows in chunks(&t.segments[si], t.row_bytes()) {
                fill_rows(&mut fill, ti, t, rows, &mut buf)?;
                h.update(&buf);
                done += buf.len() as u64;
                progress(done, total_work);
            }
            view.tensors[ti].segments[si].crc32 = h.finalize();
        }
    }
    for (b, spec) in view.blobs.iter_mut().zip(blobs) {
        b.segment.crc32 = crc32fast::hash(spec.bytes);
        done += spec.bytes.len() as u64;
        progress(done, total_work);
    }

    // Pass 2: header, then the segments in file order with zero padding between them.
    let header = encode_header(&view, &json);
    let total = view.file_len;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, out);
    out.write_all(&header)?;
    let mut pos = header.len() as u64;
    let zeros = vec![0u8; view.alignment as usize];
    let order: Vec<SegRef> = {
        let mut o: Vec<(u64, SegRef)> = view
            .tensors
            .iter()
            .enumerate()
            .flat_map(|(ti, t)| t.segments.iter().enumerate().map(move |(si, s)| (s.offset, SegRef::Tensor(ti, si))))
            .chain(view.blobs.iter().enumerate().map(|(bi, b)| (b.segment.offset, SegRef::Blob(bi))))
            .collect();
        o.sort_by_key(|&(offset, _)| offset);
        o.into_iter().map(|(_, r)| r).collect()
    };
    for r in order {
        let (ti, si) = match r {
            SegRef::Tensor(ti, si) => (ti, si),
            SegRef::Blob(bi) => {
                let seg = &view.blobs[bi].segment;
                write_zeros(&mut out, &zeros, &mut pos, seg.offset)?;
                out.write_all(blobs[bi].bytes)?;
                pos += seg.byte_len;
                progress(total.saturating_add(pos).min(total_work), total_work);
                continue;
            }
        };
        let t = &view.tensors[ti];
        let seg = &t.segments[si];
        write_zeros(&mut out, &zeros, &mut pos, seg.offset)?;
        let mut h = crc32fast::Hasher::new();
        for rows in chunks(seg, t.row_bytes()) {
            fill_rows(&mut fill, ti, t, rows, &mut buf)?;
            h.update(&buf);
            out.write_all(&buf)?;
            pos += buf.len() as u64;
            progress(total.saturating_add(pos).min(total_work), total_work);
        }
        if h.finalize() != seg.crc32 {
            return Err(FormatError::FillNotDeterministic {
                tensor: t.name.clone(),
                row_start: seg.row_start,
                row_end: seg.row_end,
            });
        }
    }
    out.flush()?;
    debug_assert_eq!(pos, total);
    Ok(pos)
}

/// Writes zero bytes from `*pos` up to `to`.
fn write_zeros(out: &mut impl Write, zeros: &[u8], pos: &mut u64, to: u64) -> Result<(), FormatError> {
    while *pos < to {
        let n = (to - *pos).min(zeros.len() as u64) as usize;
        out.write_all(&zeros[..n])?;
        *pos += n as u64;
    }
    Ok(())
}
