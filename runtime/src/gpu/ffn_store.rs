//! The FFN weight store of a [`GpuEngine`](super::GpuEngine): for every layer, the rows
//! `[0, width)` of its `ffn_up`, `ffn_gate` and `ffn_down_t` on the GPU, shared by every
//! session of the engine.
//!
//! A MatFormer submodel reads a row prefix of each FFN tensor, so the store only ever grows or
//! shrinks prefixes:
//!
//! - **grow** (a session needs a wider layer): the missing rows `[width, new)` are uploaded from
//!   the mapping as new row chunks appended to the matrix. Nothing already on the GPU is copied
//!   or re-uploaded; the bytes uploaded are exactly the missing prefix bytes.
//! - **narrow views** (a session needs a narrower layer): a view of the first rows of the stored
//!   matrix (the same buffers, chunk row counts truncated). No allocation, no copy.
//! - **trim** (memory pressure): chunks wholly beyond the new width are dropped; a chunk that
//!   straddles it is replaced by a re-upload of its kept rows. The GPU memory is returned when
//!   no session holds the old chunks any more.
//!
//! Chunk boundaries therefore fall at widths that were once requested (level ends) and at the
//! storage-binding limit; each chunk is one dispatch of the matmul kernels.

use std::sync::Arc;

use super::device::Gpu;
use super::weights::{gpu_row_bytes, Chunk, GpuMatrix};
use super::GpuError;
use crate::ModelFile;

/// One layer's FFN weights on the GPU, rows `[0, width)`.
#[derive(Debug)]
pub(crate) struct LayerFfn {
    pub(crate) width: usize,
    pub(crate) up: GpuMatrix,
    pub(crate) gate: Option<GpuMatrix>,
    pub(crate) down: GpuMatrix,
}

/// Bytes moved by a store operation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct StoreStats {
    /// Bytes written from the mapping to the GPU.
    pub(crate) uploaded_bytes: u64,
    /// Bytes of GPU buffers the store stopped holding.
    pub(crate) released_bytes: u64,
}

impl StoreStats {
    pub(crate) fn add(&mut self, o: StoreStats) {
        self.uploaded_bytes += o.uploaded_bytes;
        self.released_bytes += o.released_bytes;
    }
}

impl LayerFfn {
    /// GPU bytes of the stored rows.
    pub(crate) fn bytes(&self) -> u64 {
        self.up.bytes() + self.gate.as_ref().map_or(0, GpuMatrix::bytes) + self.down.bytes()
    }

    /// The first `width` rows (at most [`LayerFfn::width`]) of each tensor, sharing buffers.
    pub(crate) fn prefix(&self, width: usize) -> (GpuMatrix, Option<GpuMatrix>, GpuMatrix) {
        (prefix(&self.up, width), self.gate.as_ref().map(|g| prefix(g, width)), prefix(&self.down, width))
    }
}

/// Which tensors a layer has and their row length.
pub(crate) struct FfnShape<'a> {
    pub(crate) model: &'a ModelFile,
    pub(crate) layer: usize,
    pub(crate) cols: usize,
    pub(crate) gated: bool,
    pub(crate) max_binding: u64,
    /// Release the mapping's pages after each upload (`GpuOptions::release_uploaded_pages`).
    pub(crate) release_pages: bool,
}

impl FfnShape<'_> {
    fn names(&self) -> [(String, bool); 3] {
        use crate::format::names;
        [
            (names::layer(self.layer, names::FFN_UP), true),
            (names::layer(self.layer, names::FFN_GATE), self.gated),
            (names::layer(self.layer, names::FFN_DOWN_T), true),
        ]
    }

    /// GPU bytes of rows `[from, to)` of the layer's tensors (padded rows, as uploaded).
    pub(crate) fn bytes_between(&self, from: usize, to: usize) -> Result<u64, GpuError> {
        let mut total = 0u64;
        for (name, present) in self.names() {
            if present {
                total += padded_row_bytes(self.model, &name, self.cols)? * to.saturating_sub(from) as u64;
            }
        }
        Ok(total)
    }

    /// `old` grown to `width` rows: the rows `[old.width, width)` are uploaded as new chunks.
    /// `old = None` uploads `[0, width)`.
    pub(crate) fn grow(&self, gpu: &Gpu, old: Option<&LayerFfn>, width: usize) -> Result<(LayerFfn, u64), GpuError> {
        let from = old.map_or(0, |o| o.width);
        debug_assert!(width > from);
        let [(up_n, _), (gate_n, gated), (down_n, _)] = self.names();
        let mut uploaded = 0u64;
        let mut one = |name: &str, old: Option<&GpuMatrix>| -> Result<GpuMatrix, GpuError> {
            let added = upload_rows(gpu, self, name, from, width)?;
            uploaded += added.bytes();
            Ok(match old {
                Some(o) => GpuMatrix {
                    cols: o.cols,
                    f32: o.f32,
                    quant: o.quant,
                    row_units: o.row_units,
                    chunks: o.chunks.iter().map(clone_chunk).chain(added.chunks).collect(),
                },
                None => added,
            })
        };
        let up = one(&up_n, old.map(|o| &o.up))?;
        let gate = if gated { Some(one(&gate_n, old.and_then(|o| o.gate.as_ref()))?) } else { None };
        let down = one(&down_n, old.map(|o| &o.down))?;
        Ok((LayerFfn { width, up, gate, down }, uploaded))
    }

    /// `old` cut to `width` rows (`0 < width < old.width`): chunks beyond are dropped, a chunk
    /// across `width` is re-uploaded with its kept rows only.
    pub(crate) fn trim(&self, gpu: &Gpu, old: &LayerFfn, width: usize) -> Result<(LayerFfn, StoreStats), GpuError> {
        let [(up_n, _), (gate_n, _), (down_n, _)] = self.names();
        let mut stats = StoreStats::default();
        let mut one = |name: &str, m: &GpuMatrix| -> Result<GpuMatrix, GpuError> {
            let mut chunks = Vec::with_capacity(m.chunks.len());
            for c in &m.chunks {
                let end = c.row_start + c.rows;
                if end <= width {
                    chunks.push(clone_chunk(c));
                    continue;
                }
                stats.released_bytes += c.buffer.size();
                if c.row_start < width {
                    let kept = upload_rows(gpu, self, name, c.row_start, width)?;
                    stats.uploaded_bytes += kept.bytes();
                    chunks.extend(kept.chunks);
                }
            }
            Ok(GpuMatrix { cols: m.cols, f32: m.f32, quant: m.quant, row_units: m.row_units, chunks })
        };
        let up = one(&up_n, &old.up)?;
        let gate = match &old.gate {
            Some(g) => Some(one(&gate_n, g)?),
            None => None,
        };
        let down = one(&down_n, &old.down)?;
        Ok((LayerFfn { width, up, gate, down }, stats))
    }
}

fn clone_chunk(c: &Chunk) -> Chunk {
    Chunk { buffer: c.buffer.clone(), row_start: c.row_start, rows: c.rows }
}

/// The first `width` rows of `m` (chunks past it dropped, the last one truncated).
pub(crate) fn prefix(m: &GpuMatrix, width: usize) -> GpuMatrix {
    let chunks = m
        .chunks
        .iter()
        .filter(|c| c.row_start < width)
        .map(|c| Chunk { buffer: c.buffer.clone(), row_start: c.row_start, rows: c.rows.min(width - c.row_start) })
        .collect();
    GpuMatrix { cols: m.cols, f32: m.f32, quant: m.quant, row_units: m.row_units, chunks }
}

/// Bytes of one GPU row of tensor `name` (`cols` elements per row; padded f16/f32 rows,
/// repacked quantised rows).
fn padded_row_bytes(model: &ModelFile, name: &str, cols: usize) -> Result<u64, GpuError> {
    let info = model.view().tensor(name).map_err(crate::ModelError::from)?;
    Ok(gpu_row_bytes(info.dtype, cols))
}

/// Rows `[from, to)` of tensor `name` uploaded as a matrix whose chunks carry their absolute
/// row numbers. Reads only the segments covering those rows.
fn upload_rows(gpu: &Gpu, shape: &FfnShape<'_>, name: &str, from: usize, to: usize) -> Result<GpuMatrix, GpuError> {
    let mut m =
        GpuMatrix::upload_rows(gpu, shape.model, name, from, to, shape.cols, shape.max_binding, shape.release_pages)?;
    for c in &mut m.chunks {
        c.row_start += from;
    }
    Ok(m)
}

/// A layer's FFN rows as the store hands them out: `None` for a layer of width 0 (skipped).
pub(crate) type StoredLayer = Option<Arc<LayerFfn>>;

/// The store: one slot per layer, `None` until a session needs the layer.
#[derive(Debug, Default)]
pub(crate) struct FfnStore {
    pub(crate) layers: Vec<Option<Arc<LayerFfn>>>,
}

impl FfnStore {
    pub(crate) fn new(n_layers: usize) -> FfnStore {
        FfnStore { layers: vec![None; n_layers] }
    }

    /// GPU bytes the store holds.
    pub(crate) fn bytes(&self) -> u64 {
        self.layers.iter().flatten().map(|l| l.bytes()).sum()
    }

    /// Bytes `ensure(widths)` would allocate.
    pub(crate) fn missing_bytes(&self, shapes: &[FfnShape<'_>], widths: &[usize]) -> Result<u64, GpuError> {
        let mut total = 0u64;
        for ((slot, shape), &w) in self.layers.iter().zip(shapes).zip(widths) {
            let have = slot.as_ref().map_or(0, |l| l.width);
            if w > have {
                total += shape.bytes_between(have, w)?;
            }
        }
        Ok(total)
    }

    /// Makes every layer hold at least `widths[i]` rows (uploading only what is missing) and
    /// returns the layers (`None` where the width is 0). On error the store keeps what it held before.
    pub(crate) fn ensure(
        &mut self,
        gpu: &Gpu,
        shapes: &[FfnShape<'_>],
        widths: &[usize],
    ) -> Result<(Vec<StoredLayer>, StoreStats), GpuError> {
        let mut stats = StoreStats::default();
        let mut next = self.layers.clone();
        for ((slot, shape), &w) in next.iter_mut().zip(shapes).zip(widths) {
            let have = slot.as_ref().map_or(0, |l| l.width);
            if w > have {
                let (grown, uploaded) = shape.grow(gpu, slot.as_deref(), w)?;
                stats.uploaded_bytes += uploaded;
                *slot = Some(Arc::new(grown));
            }
        }
        // A layer of width 0 (skipped, elastic depth) holds no rows.
        let out = next
            .iter()
            .zip(widths)
            .map(|(s, &w)| if w == 0 { Ok(None) } else { s.clone().ok_or_else(missing_layer).map(Some) })
            .collect::<Result<Vec<_>, _>>()?;
        self.layers = next;
        Ok((out, stats))
    }

    /// Cuts every layer to at most `widths[i]` rows. On error the store keeps what it held.
    pub(crate) fn trim(
        &mut self,
        gpu: &Gpu,
        shapes: &[FfnShape<'_>],
        widths: &[usize],
    ) -> Result<StoreStats, GpuError> {
        let mut stats = StoreStats::default();
        let mut next = self.layers.clone();
        for ((slot, shape), &w) in next.iter_mut().zip(shapes).zip(widths) {
            let Some(layer) = slot.as_ref() else { continue };
            if w == 0 {
                stats.released_bytes += layer.bytes();
                *slot = None;
            } else if w < layer.width {
                let (cut, s) = shape.trim(gpu, layer, w)?;
                stats.add(s);
                *slot = Some(Arc::new(cut));
            }
        }
        self.layers = next;
        Ok(stats)
    }
}

fn missing_layer() -> GpuError {
    GpuError::Unsupported { reason: "internal: an FFN layer was not uploaded".into() }
}
