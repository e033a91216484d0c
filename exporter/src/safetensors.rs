//! The safetensors container, parsed from a byte slice with every length and offset checked.
//! Self-contained (std and serde_json only) so the fuzz target (`fuzz/fuzz_targets/safetensors.rs`)
//! compiles it on its own.

use std::collections::BTreeMap;

use serde_json::Value as Json;

/// Largest safetensors JSON header accepted (the `safetensors` crate's limit).
const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

/// One tensor of a safetensors file.
pub struct StTensor<'a> {
    /// Element type as written (`"F16"`, `"BF16"`, `"F32"` ...).
    pub dtype: String,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// The tensor's bytes.
    pub data: &'a [u8],
}

/// A safetensors file: `u64` little-endian header length `n`, `n` bytes of JSON
/// (`{"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`), then
/// the data, offsets relative to its start. Every length, offset and size is checked against
/// the file, tensors may not overlap, and each tensor's bytes must be exactly its shape times
/// its element size. (Our own parser rather than the `safetensors` crate: its current version
/// turns on `hashbrown/serde`, which changes the build of every crate using hashbrown, tract
/// included.)
pub fn parse_safetensors(bytes: &[u8]) -> Result<BTreeMap<String, StTensor<'_>>, String> {
    let head: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| format!("truncated: {} bytes, shorter than the 8-byte header length", bytes.len()))?;
    let n = u64::from_le_bytes(head);
    if n > MAX_SAFETENSORS_HEADER || n > bytes.len() as u64 - 8 {
        return Err(format!(
            "header length {n} exceeds the file ({} bytes) or the {MAX_SAFETENSORS_HEADER}-byte limit",
            bytes.len()
        ));
    }
    let header = &bytes[8..8 + n as usize];
    let data = &bytes[8 + n as usize..];
    let json: Json = serde_json::from_slice(header).map_err(|e| format!("header is not valid JSON: {e}"))?;
    let obj = json.as_object().ok_or("header is not a JSON object")?;
    let mut out = BTreeMap::new();
    let mut spans = Vec::new();
    for (name, t) in obj {
        if name == "__metadata__" {
            continue;
        }
        let bad = |what: &str| format!("tensor `{name}`: {what}");
        let dtype = t.get("dtype").and_then(Json::as_str).ok_or_else(|| bad("no string `dtype`"))?.to_string();
        let shape = t
            .get("shape")
            .and_then(Json::as_array)
            .ok_or_else(|| bad("no `shape` array"))?
            .iter()
            .map(|d| {
                d.as_u64().and_then(|d| usize::try_from(d).ok()).ok_or_else(|| bad("a dimension is not an integer"))
            })
            .collect::<Result<Vec<usize>, String>>()?;
        let offs = t.get("data_offsets").and_then(Json::as_array).ok_or_else(|| bad("no `data_offsets`"))?;
        let (begin, end) = match offs.as_slice() {
            [b, e] => (b.as_u64().ok_or_else(|| bad("bad offset"))?, e.as_u64().ok_or_else(|| bad("bad offset"))?),
            _ => return Err(bad("`data_offsets` is not [begin, end]")),
        };
        if begin > end || end > data.len() as u64 {
            return Err(bad(&format!("data [{begin}, {end}) lies outside the {} data bytes (truncated?)", data.len())));
        }
        let elem = match dtype.as_str() {
            "F64" | "I64" | "U64" => 8,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            _ => 1,
        };
        let want = shape.iter().try_fold(elem as u64, |acc, &d| acc.checked_mul(d as u64));
        if want != Some(end - begin) {
            return Err(bad(&format!("shape {shape:?} of {dtype} does not match its {} data bytes", end - begin)));
        }
        spans.push((begin, end, name.clone()));
        out.insert(name.clone(), StTensor { dtype, shape, data: &data[begin as usize..end as usize] });
    }
    spans.sort_unstable();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(format!("tensors `{}` and `{}` overlap", w[0].2, w[1].2));
        }
    }
    Ok(out)
}
