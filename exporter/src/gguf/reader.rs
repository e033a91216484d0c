//! GGUF (v2 and v3) container reader over a byte slice (typically a memory map).
//!
//! Every length, count, offset and size read from the file is checked against the bytes that
//! remain before it is used, so a truncated or hostile file yields a [`GgufError`] naming the
//! problem and never a panic, an out-of-bounds read or an allocation larger than the input.
//! Self-contained (only `half` and `thiserror`), so the fuzz target compiles it on its own.
//!
//! Layout (little-endian): magic `GGUF`, version `u32`, tensor count `u64`, key/value count
//! `u64`, the key/value pairs, the tensor infos (name, `n_dims: u32`, `ne[n_dims]: u64`,
//! `ggml_type: u32`, `offset: u64`), padding to `general.alignment` (default 32), then the
//! tensor data; each tensor's `offset` is relative to the data start and aligned.

use std::collections::BTreeMap;

/// Most tensors a file may declare.
pub const MAX_TENSORS: u64 = 1 << 16;
/// Most key/value pairs a file may declare.
pub const MAX_KV: u64 = 1 << 16;
/// Most dimensions of a tensor (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;
/// Deepest nesting of arrays inside arrays.
pub const MAX_ARRAY_DEPTH: u32 = 3;
/// Longest string (key, value or tensor name), in bytes.
pub const MAX_STRING_LEN: u64 = 1 << 26;
/// Most elements of one tensor.
pub const MAX_TENSOR_ELEMENTS: u64 = 1 << 40;

/// Why a GGUF file was refused. Display is one line naming the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GgufError {
    /// The file ends before a field it must hold.
    #[error("GGUF file truncated: needs {needed} bytes at offset {offset} for {what}, only {available} remain")]
    Truncated {
        /// What was being read.
        what: String,
        /// Byte offset of the read.
        offset: u64,
        /// Bytes the read needs.
        needed: u64,
        /// Bytes left in the file.
        available: u64,
    },
    /// Not a GGUF file.
    #[error("not a GGUF file (magic {found:02x?}, expected \"GGUF\")")]
    BadMagic {
        /// The first four bytes.
        found: [u8; 4],
    },
    /// A version this reader does not know.
    #[error("unsupported GGUF version {0} (supported: 2 and 3)")]
    UnsupportedVersion(u32),
    /// A structurally impossible value.
    #[error("malformed GGUF file: {0}")]
    Malformed(String),
    /// A tensor element type this importer cannot dequantise.
    #[error("tensor `{name}` has ggml type {type_name} ({code}), which is not supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K)")]
    UnsupportedType {
        /// Tensor name.
        name: String,
        /// ggml type code.
        code: u32,
        /// ggml type name, or `unknown`.
        type_name: String,
    },
    /// A required key is absent or of the wrong type.
    #[error("GGUF metadata key `{key}` {problem}")]
    Key {
        /// The key.
        key: String,
        /// `is missing`, `is not an unsigned integer`, ...
        problem: String,
    },
    /// A required tensor is absent.
    #[error("GGUF file has no tensor `{0}`")]
    MissingTensor(String),
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `UINT8`.
    U8(u8),
    /// `INT8`.
    I8(i8),
    /// `UINT16`.
    U16(u16),
    /// `INT16`.
    I16(i16),
    /// `UINT32`.
    U32(u32),
    /// `INT32`.
    I32(i32),
    /// `FLOAT32`.
    F32(f32),
    /// `BOOL`.
    Bool(bool),
    /// `STRING` (must be UTF-8).
    String(String),
    /// `ARRAY` of values of one type.
    Array(Vec<Value>),
    /// `UINT64`.
    U64(u64),
    /// `INT64`.
    I64(i64),
    /// `FLOAT64`.
    F64(f64),
}

impl Value {
    /// The value as a non-negative integer, if it is an integer type holding one.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a boolean, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The value as an array, if it is one.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// ggml tensor element types the importer dequantises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
    /// Blocks of 32: f16 scale, 32 x i8.
    Q8_0,
    /// Blocks of 32: f16 scale, 32 x 4-bit (offset 8).
    Q4_0,
    /// Blocks of 32: f16 scale and min, 32 x 4-bit.
    Q4_1,
    /// Super-blocks of 256: f16 scale and min, 8 x 6-bit sub-scales and mins, 256 x 4-bit.
    Q4K,
    /// Super-blocks of 256: 256 x 6-bit, 16 x i8 sub-scales, f16 scale.
    Q6K,
}

impl GgmlType {
    /// The type for a ggml type code, or `None` when unsupported.
    pub fn from_code(code: u32) -> Option<GgmlType> {
        Some(match code {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            14 => GgmlType::Q6K,
            30 => GgmlType::Bf16,
            _ => return None,
        })
    }

    /// ggml's name of a type code (also for the unsupported ones, for error messages).
    pub fn code_name(code: u32) -> &'static str {
        const NAMES: [&str; 42] = [
            "F32",
            "F16",
            "Q4_0",
            "Q4_1",
            "Q4_2",
            "Q4_3",
            "Q5_0",
            "Q5_1",
            "Q8_0",
            "Q8_1",
            "Q2_K",
            "Q3_K",
            "Q4_K",
            "Q5_K",
            "Q6_K",
            "Q8_K",
            "IQ2_XXS",
            "IQ2_XS",
            "IQ3_XXS",
            "IQ1_S",
            "IQ4_NL",
            "IQ3_S",
            "IQ2_S",
            "IQ4_XS",
            "I8",
            "I16",
            "I32",
            "I64",
            "F64",
            "IQ1_M",
            "BF16",
            "Q4_0_4_4",
            "Q4_0_4_8",
            "Q4_0_8_8",
            "TQ1_0",
            "TQ2_0",
            "IQ4_NL_4_4",
            "IQ4_NL_4_8",
            "IQ4_NL_8_8",
            "MXFP4",
            "NVFP4",
            "Q1_0",
        ];
        NAMES.get(code as usize).copied().unwrap_or("unknown")
    }

    /// ggml's name of this type.
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Bf16 => "BF16",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q6K => "Q6_K",
        }
    }

    /// Elements per block.
    pub fn block_elems(self) -> u64 {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16 => 1,
            GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1 => 32,
            GgmlType::Q4K | GgmlType::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> u64 {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::Bf16 => 2,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q4K => 144,
            GgmlType::Q6K => 210,
        }
    }
}

/// One tensor's description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Name (`blk.0.attn_q.weight`).
    pub name: String,
    /// ggml dimensions, innermost first: `ne[0]` is the contiguous row length.
    pub ne: Vec<u64>,
    /// ggml type code as stored.
    pub type_code: u32,
    /// Byte offset from the start of the data section.
    pub offset: u64,
    /// Byte length of the data, checked to lie inside the file.
    pub byte_len: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.ne.iter().product()
    }

    /// Row-major shape (outermost first), the PyTorch view of the tensor.
    pub fn shape(&self) -> Vec<u64> {
        self.ne.iter().rev().copied().collect()
    }
}

/// A parsed GGUF file borrowing its bytes.
#[derive(Debug)]
pub struct Gguf<'a> {
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata in key order.
    pub metadata: BTreeMap<String, Value>,
    /// Tensors in file order.
    pub tensors: Vec<TensorInfo>,
    /// Alignment of the data section and of every tensor, in bytes.
    pub alignment: u64,
    /// Byte offset of the data section in the file.
    pub data_offset: u64,
    bytes: &'a [u8],
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], GgufError> {
        let avail = self.remaining() as u64;
        if n > avail {
            return Err(GgufError::Truncated {
                what: what.to_string(),
                offset: self.pos as u64,
                needed: n,
                available: avail,
            });
        }
        let n = n as usize;
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        if len > MAX_STRING_LEN {
            return Err(GgufError::Malformed(format!("{what}: string of {len} bytes (limit {MAX_STRING_LEN})")));
        }
        let at = self.pos;
        let raw = self.take(len, what)?;
        String::from_utf8(raw.to_vec())
            .map_err(|_| GgufError::Malformed(format!("{what}: string at offset {at} is not UTF-8")))
    }

    /// A value of type `ty`; `depth` counts enclosing arrays.
    fn value(&mut self, ty: u32, what: &str, depth: u32) -> Result<Value, GgufError> {
        Ok(match ty {
            0 => Value::U8(u8::from_le_bytes(self.array(what)?)),
            1 => Value::I8(i8::from_le_bytes(self.array(what)?)),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(GgufError::Malformed(format!("{what}: boolean byte {b} (expected 0 or 1)"))),
            },
            8 => Value::String(self.string(what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::Malformed(format!("{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}")));
                }
                let elem_ty = self.u32(what)?;
                let n = self.u64(what)?;
                // Every element takes at least one byte (strings and arrays at least 8), so a
                // count beyond the remaining bytes is a lie; checking it first bounds the
                // allocation by the input's size.
                let min_elem: u64 = match elem_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => return Err(GgufError::Malformed(format!("{what}: unknown array element type {t}"))),
                };
                if n.checked_mul(min_elem).is_none_or(|b| b > self.remaining() as u64) {
                    return Err(GgufError::Truncated {
                        what: format!("{what} ({n} array elements)"),
                        offset: self.pos as u64,
                        needed: n.saturating_mul(min_elem),
                        available: self.remaining() as u64,
                    });
                }
                let mut out = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    out.push(self.value(elem_ty, what, depth + 1)?);
                }
                Value::Array(out)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            t => return Err(GgufError::Malformed(format!("{what}: unknown value type {t}"))),
        })
    }
}

impl<'a> Gguf<'a> {
    /// Parses the header, metadata and tensor table of `bytes`, checking every tensor's data
    /// lies inside `bytes`, is aligned and does not overlap another.
    pub fn parse(bytes: &'a [u8]) -> Result<Gguf<'a>, GgufError> {
        let mut c = Cursor { bytes, pos: 0 };
        let magic: [u8; 4] = c.array("magic")?;
        if &magic != b"GGUF" {
            return Err(GgufError::BadMagic { found: magic });
        }
        let version = c.u32("version")?;
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        if n_tensors > MAX_TENSORS {
            return Err(GgufError::Malformed(format!("{n_tensors} tensors (limit {MAX_TENSORS})")));
        }
        if n_kv > MAX_KV {
            return Err(GgufError::Malformed(format!("{n_kv} metadata entries (limit {MAX_KV})")));
        }
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key {i}"))?;
            let what = format!("metadata `{key}`");
            let ty = c.u32(&what)?;
            let value = c.value(ty, &what, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(GgufError::Malformed(format!("metadata key `{key}` appears twice")));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && (8..=1 << 20).contains(&a) => a,
                _ => {
                    return Err(GgufError::Malformed(format!(
                        "general.alignment {v:?} is not a power of two in 8..=1 MiB"
                    )))
                }
            },
        };
        let mut tensors = Vec::with_capacity(n_tensors.min(c.remaining() as u64 / 24) as usize);
        let mut names = std::collections::HashSet::new();
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor {i} name"))?;
            let what = format!("tensor `{name}`");
            let n_dims = c.u32(&what)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(GgufError::Malformed(format!("{what} has {n_dims} dimensions (expected 1..={MAX_DIMS})")));
            }
            let mut ne = Vec::with_capacity(n_dims as usize);
            let mut n: u64 = 1;
            for _ in 0..n_dims {
                let d = c.u64(&what)?;
                if d == 0 {
                    return Err(GgufError::Malformed(format!("{what} has a zero dimension")));
                }
                n = n.checked_mul(d).filter(|&n| n <= MAX_TENSOR_ELEMENTS).ok_or_else(|| {
                    GgufError::Malformed(format!("{what} has more than {MAX_TENSOR_ELEMENTS} elements"))
                })?;
                ne.push(d);
            }
            let type_code = c.u32(&what)?;
            let offset = c.u64(&what)?;
            if !names.insert(name.clone()) {
                return Err(GgufError::Malformed(format!("tensor `{name}` appears twice")));
            }
            // Byte length for supported types; unsupported ones keep 0 and are refused when read.
            let byte_len = match GgmlType::from_code(type_code) {
                Some(t) => {
                    if !ne[0].is_multiple_of(t.block_elems()) {
                        return Err(GgufError::Malformed(format!(
                            "{what}: row length {} is not a multiple of the {} block size {}",
                            ne[0],
                            t.name(),
                            t.block_elems()
                        )));
                    }
                    (n / t.block_elems()) * t.block_bytes()
                }
                None => 0,
            };
            if !offset.is_multiple_of(alignment) {
                return Err(GgufError::Malformed(format!("{what}: offset {offset} is not a multiple of {alignment}")));
            }
            tensors.push(TensorInfo { name, ne, type_code, offset, byte_len });
        }
        let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
        let data_len = (bytes.len() as u64).saturating_sub(data_offset);
        if data_offset > bytes.len() as u64 && !tensors.is_empty() {
            return Err(GgufError::Truncated {
                what: "data section".into(),
                offset: c.pos as u64,
                needed: data_offset - c.pos as u64,
                available: c.remaining() as u64,
            });
        }
        let mut spans: Vec<(u64, u64, &str)> = Vec::with_capacity(tensors.len());
        for t in &tensors {
            let end =
                t.offset.checked_add(t.byte_len).filter(|&e| e <= data_len).ok_or_else(|| GgufError::Truncated {
                    what: format!("tensor `{}` data", t.name),
                    offset: data_offset.saturating_add(t.offset),
                    needed: t.byte_len,
                    available: data_len.saturating_sub(t.offset),
                })?;
            if t.byte_len > 0 {
                spans.push((t.offset, end, &t.name));
            }
        }
        spans.sort_unstable();
        for w in spans.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(GgufError::Malformed(format!("tensors `{}` and `{}` overlap", w[0].2, w[1].2)));
            }
        }
        Ok(Gguf { version, metadata, tensors, alignment, data_offset, bytes })
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A required unsigned integer.
    pub fn u64_key(&self, key: &str) -> Result<u64, GgufError> {
        let v = self.get(key).ok_or_else(|| GgufError::Key { key: key.into(), problem: "is missing".into() })?;
        v.as_u64()
            .ok_or_else(|| GgufError::Key { key: key.into(), problem: format!("is {v:?}, not an unsigned integer") })
    }

    /// A required float.
    pub fn f64_key(&self, key: &str) -> Result<f64, GgufError> {
        let v = self.get(key).ok_or_else(|| GgufError::Key { key: key.into(), problem: "is missing".into() })?;
        v.as_f64().ok_or_else(|| GgufError::Key { key: key.into(), problem: format!("is {v:?}, not a number") })
    }

    /// A required string.
    pub fn str_key(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.get(key).ok_or_else(|| GgufError::Key { key: key.into(), problem: "is missing".into() })?;
        v.as_str().ok_or_else(|| GgufError::Key { key: key.into(), problem: "is not a string".into() })
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor of a supported type (checked in [`Gguf::parse`]).
    pub fn tensor_bytes(&self, t: &TensorInfo) -> Result<(GgmlType, &'a [u8]), GgufError> {
        let ty = GgmlType::from_code(t.type_code).ok_or_else(|| GgufError::UnsupportedType {
            name: t.name.clone(),
            code: t.type_code,
            type_name: GgmlType::code_name(t.type_code).to_string(),
        })?;
        let start = self.data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(t.byte_len));
        match (start, end) {
            (Some(s), Some(e)) if e <= self.bytes.len() as u64 => Ok((ty, &self.bytes[s as usize..e as usize])),
            _ => Err(GgufError::Malformed(format!("tensor `{}` data lies outside the file", t.name))),
        }
    }

    /// A tensor dequantised to f32, row-major in ggml order (`ne[0]` contiguous).
    pub fn dequantize(&self, t: &TensorInfo) -> Result<Vec<f32>, GgufError> {
        let (ty, raw) = self.tensor_bytes(t)?;
        let mut out = vec![0f32; t.n_elements() as usize];
        super::dequant::dequantize(ty, raw, &mut out)
            .map_err(|e| GgufError::Malformed(format!("tensor `{}`: {e}", t.name)))?;
        Ok(out)
    }
}
