//! Every way a `.matf` file can be rejected. One variant per failure, with structured fields;
//! each message says what is wrong and, where there is one, what to do about it.

/// An error found while parsing, verifying or writing a `.matf` file.
///
/// Readers never panic and never read out of bounds on bad input: every failure is one of
/// these variants. The numbered reader invariants in `docs/format.md` map onto them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The first four bytes are not `MATF`.
    #[error("not a .matf file: magic is {found:02x?}, expected \"MATF\" (4d 41 54 46)")]
    BadMagic {
        /// The four bytes found (zero-padded if the input is shorter).
        found: [u8; 4],
    },
    /// The version field names a format this reader does not understand.
    #[error("unsupported .matf version {found} (this reader supports version {supported}); upgrade the runtime or re-export the model")]
    UnsupportedVersion {
        /// Version in the file.
        found: u32,
        /// Version this reader implements.
        supported: u32,
    },
    /// The flags field has bits this reader does not know.
    #[error("unknown header flags {flags:#010x}; the file needs a newer reader")]
    UnknownFlags {
        /// The flags field.
        flags: u32,
    },
    /// `alignment_log2` is outside `12..=24`.
    #[error("alignment_log2 {log2} is outside 12..=24 (4 KiB to 16 MiB); the header is corrupt")]
    BadAlignment {
        /// The stored `alignment_log2`.
        log2: u32,
    },
    /// A count in the header is outside its allowed range.
    #[error("{what} is {found}, allowed {min}..={max}; the header is corrupt")]
    BadCount {
        /// Which count (`"n_levels"`, `"n_tensors"`, `"n_segments"`).
        what: &'static str,
        /// The stored value.
        found: u64,
        /// Smallest allowed value.
        min: u64,
        /// Largest allowed value.
        max: u64,
    },
    /// A reserved field is not zero.
    #[error("reserved {what} at byte {offset} is not zero; the file is corrupt or needs a newer reader")]
    ReservedNonZero {
        /// Which field.
        what: &'static str,
        /// Absolute offset of the field.
        offset: u64,
    },
    /// `header_len` disagrees with `64 + 8 * n_levels + metadata_len + table_len`, or is absurd.
    #[error("header_len is {stated} but the preamble implies {computed}; the header is corrupt")]
    HeaderLength {
        /// `header_len` as stored.
        stated: u64,
        /// The value implied by the other fields (`u64::MAX` if it overflows).
        computed: u64,
    },
    /// The input ends before a part that must be present.
    #[error("truncated: the {what} needs {needed} bytes but only {len} are present; re-download the file")]
    Truncated {
        /// Bytes needed.
        needed: u64,
        /// Bytes present.
        len: u64,
        /// What is cut (`"preamble"`, `"header"`, `"level 0"`).
        what: &'static str,
    },
    /// The file ends strictly inside a level (only cuts at level ends are valid smaller models).
    #[error("file is cut inside level {level} (bytes {level_start}..{level_end}) at length {len}; finish the download or cut it to {level_start} bytes")]
    TruncatedInsideLevel {
        /// The level that is incomplete.
        level: usize,
        /// Where that level's bytes start (= the end of the previous level).
        level_start: u64,
        /// Where that level's bytes end.
        level_end: u64,
        /// The file length.
        len: u64,
    },
    /// The file is longer than the last level end.
    #[error("file has {len} bytes but the header says it ends at {expected}; trailing bytes were appended, cut the file to {expected} bytes")]
    TrailingBytes {
        /// Length the header describes.
        expected: u64,
        /// Actual length.
        len: u64,
    },
    /// The bytes passed to `verify` are not the length that was parsed.
    #[error("file length changed from {parsed} to {now} bytes since it was parsed; re-open it")]
    FileLengthChanged {
        /// Length at parse time.
        parsed: u64,
        /// Length now.
        now: u64,
    },
    /// The header CRC does not match.
    #[error("header checksum mismatch (stored {stored:#010x}, computed {computed:#010x}); the header is corrupt, re-download the file")]
    HeaderChecksum {
        /// CRC stored in the file.
        stored: u32,
        /// CRC of the bytes.
        computed: u32,
    },
    /// A segment's CRC does not match its bytes.
    #[error("checksum mismatch in tensor {tensor} level {level} at byte {offset} (stored {stored:#010x}, computed {computed:#010x}); the data is corrupt, re-download the file")]
    SegmentChecksum {
        /// Tensor name.
        tensor: String,
        /// Level of the segment.
        level: u32,
        /// Absolute offset of the segment.
        offset: u64,
        /// CRC stored in the tensor table.
        stored: u32,
        /// CRC of the bytes.
        computed: u32,
    },
    /// A byte outside every segment (alignment padding) is not zero.
    #[error("padding byte at offset {offset} is not zero; the file is corrupt, re-download it")]
    NonZeroPadding {
        /// Absolute offset of the first non-zero padding byte.
        offset: u64,
    },
    /// The level table is inconsistent.
    #[error("bad level table: {reason}")]
    BadLevelTable {
        /// What is wrong.
        reason: String,
    },
    /// The metadata block is not UTF-8 JSON of the expected shape.
    #[error("metadata is not valid JSON of the expected shape: {reason}")]
    MetadataJson {
        /// The decoder's message.
        reason: String,
    },
    /// The metadata decodes but describes an impossible model.
    #[error("inconsistent metadata: {reason}")]
    BadMetadata {
        /// What is wrong.
        reason: String,
    },
    /// A tensor record is malformed (overruns the table, bad counts, leftover bytes).
    #[error("bad tensor table at record {index}: {reason}")]
    BadTensorTable {
        /// Index of the record (n_tensors for trailing bytes).
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A tensor name is empty, too long or not UTF-8.
    #[error("bad tensor name in record {index}: {reason}")]
    BadTensorName {
        /// Index of the record.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A dtype code this version does not know.
    #[error("tensor {tensor} has unknown dtype code {code}; the file needs a newer reader")]
    UnknownDType {
        /// The code.
        code: u8,
        /// Tensor name.
        tensor: String,
    },
    /// A quantised tensor whose rows are not a whole number of blocks (or a 1-D tensor, whose
    /// "rows" are single elements, in a quantised dtype).
    #[error("tensor {tensor} is {dtype} but its rows have {row_elems} elements, not a multiple of the {block}-element block; the file is corrupt")]
    BlockAlignment {
        /// Tensor name.
        tensor: String,
        /// The dtype's name.
        dtype: &'static str,
        /// Elements per row.
        row_elems: u64,
        /// Elements per block.
        block: u64,
    },
    /// A tensor's shape is malformed or not what the architecture requires.
    #[error("tensor {tensor} has a bad shape: {reason}")]
    BadShape {
        /// Tensor name.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A tensor's element count is beyond any plausible model (or overflows).
    #[error("tensor {tensor} has shape {shape:?}, more than {limit} elements; the file is corrupt")]
    AbsurdSize {
        /// Tensor name.
        tensor: String,
        /// The stored shape.
        shape: Vec<u64>,
        /// The largest element count accepted.
        limit: u64,
    },
    /// A segment is not inside its level's byte range (or not inside the input at all).
    #[error("tensor {tensor} level {level}: segment {offset}+{byte_len} is outside its level's bytes {region_start}..{region_end}")]
    SegmentOutOfBounds {
        /// Tensor name.
        tensor: String,
        /// Level of the segment.
        level: u32,
        /// Segment offset.
        offset: u64,
        /// Segment length.
        byte_len: u64,
        /// Start of the allowed range.
        region_start: u64,
        /// End of the allowed range.
        region_end: u64,
    },
    /// Two segments share bytes.
    #[error("segments overlap at byte {offset}: {a} and {b}")]
    Overlap {
        /// The first segment (`name[level j]`).
        a: String,
        /// The second segment.
        b: String,
        /// Start of the second segment.
        offset: u64,
    },
    /// A segment offset is not a multiple of the alignment.
    #[error("tensor {tensor}: segment offset {offset} is not a multiple of the alignment {alignment}")]
    Misaligned {
        /// Tensor name.
        tensor: String,
        /// Segment offset.
        offset: u64,
        /// The file's alignment.
        alignment: u64,
    },
    /// A segment's byte length does not match its rows, shape and dtype.
    #[error("tensor {tensor}: segment has {found} bytes but its rows, shape and dtype need {expected}")]
    LengthMismatch {
        /// Tensor name.
        tensor: String,
        /// Bytes implied by rows, row_elems and dtype.
        expected: u64,
        /// `byte_len` as stored (or bytes produced by a writer's fill).
        found: u64,
    },
    /// A tensor has the wrong number of segments.
    #[error("tensor {tensor} has {found} segments, expected {expected}")]
    SegmentCount {
        /// Tensor name.
        tensor: String,
        /// Expected count (1 for shared tensors, n_levels for nested ones).
        expected: u64,
        /// Stored count.
        found: u64,
    },
    /// A segment covers the wrong rows or sits at the wrong level.
    #[error("tensor {tensor} segment {index}: level {level} rows {row_start}..{row_end}, expected level {expected_level} rows {expected_start}..{expected_end}")]
    SegmentRows {
        /// Tensor name.
        tensor: String,
        /// Index of the segment in the record.
        index: usize,
        /// Stored level.
        level: u32,
        /// Stored first row.
        row_start: u64,
        /// Stored end row.
        row_end: u64,
        /// Required level.
        expected_level: u32,
        /// Required first row.
        expected_start: u64,
        /// Required end row.
        expected_end: u64,
    },
    /// A tensor the architecture requires is absent.
    #[error("missing tensor {name}")]
    MissingTensor {
        /// Tensor name.
        name: String,
    },
    /// A tensor the architecture does not use is present.
    #[error("unexpected tensor {name}: not part of this architecture")]
    UnexpectedTensor {
        /// Tensor name.
        name: String,
    },
    /// Two tensors have the same name.
    #[error("duplicate tensor {name}")]
    DuplicateTensor {
        /// Tensor name.
        name: String,
    },
    /// A blob record (`blob.*`, the stored tokenizer) is malformed.
    #[error("blob record {name} is malformed: {reason}")]
    BadBlob {
        /// The record's name as stored.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A level's bytes are not in this (cut) file.
    #[error("level {level} is not in this file (only {available} levels are present); download the rest of the file")]
    LevelNotAvailable {
        /// The requested level.
        level: usize,
        /// Levels present.
        available: usize,
    },
    /// A writer's `fill` callback returned different bytes on its two calls for the same rows.
    #[error("fill for tensor {tensor} rows {row_start}..{row_end} returned different bytes on its checksum and write passes; fill must be deterministic")]
    FillNotDeterministic {
        /// Tensor name.
        tensor: String,
        /// First row of the range.
        row_start: u64,
        /// End row of the range.
        row_end: u64,
    },
    /// An I/O error while writing.
    #[error("I/O error while writing: {0}")]
    Io(#[from] std::io::Error),
}
