//! A prefill batch's block-quantised `x @ W^T` on AVX-512 VNNI with the tokens in the vector
//! lanes, x86-64 only.
//!
//! The row-by-token kernels of [`qdot`](super::qdot) spend, per (row, token) and pair of
//! blocks, one `vpdpbusd` and then a conversion, a multiply and a multiply-add on its sixteen
//! i32 lanes: four vector operations per 64 multiply-adds, plus the unpacking of every block's
//! nibbles for each row and the broadcasting of every token's scales. Here a 512-bit vector
//! holds sixteen tokens: each 4-byte group of a weight block is broadcast to all lanes once
//! and `vpdpbusd` takes the sixteen tokens' four matching activation bytes (laid out for it
//! once per product by [`Lanes::build`]), so one block's unpacking and scale serve sixteen (or
//! thirty-two) tokens.
//!
//! The results are bitwise [`qdot::dot`](super::qdot::dot)'s. That kernel's order, per
//! (row, token): lane `g` (of eight) of a block `b` gets the integer sum of the four products
//! of positions `4g .. 4g + 4` (for `q4_0`, lane 0 also `-8 * sum(q)`), converted to f32 and
//! multiply-added with the block's scale `dw * dx` into accumulator `(g, b % 2)`; then
//! `v_g = even_g + odd_g`, summed in `hsum`'s tree (`(v0 + v4) + (v2 + v6)` and
//! `(v1 + v5) + (v3 + v7)`, added), plus the `q4_1` minimum terms `(mins0 + mins1)`. Here lane
//! `i` of accumulator `(g, parity)` is exactly that accumulator of token `i`: the integers are
//! the same integers (for `q8_0` the activations enter as `q + 128` against the signed weights,
//! the group's `-128 * sum(w)` starting the sum), and the f32 operations the same, in the same
//! order.

use std::arch::x86_64::*;

use super::qdot::QActs;
use crate::format::{DType, QK};

/// Tokens per vector (sixteen i32 or f32 lanes).
pub(crate) const LANES_T: usize = 16;

/// Fewest tokens in a last, partly filled, chunk that are still worth sixteen lanes of work:
/// fewer go through the row-by-token kernels. Measured (small_batch_speed, 8192 x 2048, two
/// threads, ms per product, row-by-token / token-lane): q4_0 at 5 tokens 1.43 / 2.40, 8
/// tokens 2.20 / 2.46, 10 tokens 2.28 / 2.19, 13 tokens 2.25 / 2.22; q8_0 at 8 tokens
/// 2.51 / 2.94, 10 tokens 2.67 / 2.62.
pub(crate) const MIN_REST: usize = 10;

/// Whether the kernel runs on this CPU (AVX-512 F/BW/VL and VNNI with AVX2, FMA and F16C).
pub(crate) fn available() -> bool {
    super::qdot::x86::has_avx512_vnni()
}

/// How many of a batch's `t` tokens go through this kernel: whole chunks of [`LANES_T`], and a
/// last partial chunk of at least [`MIN_REST`] tokens; 0 when the kernel does not run here.
pub(crate) fn tokens_for(t: usize) -> usize {
    if !available() {
        return 0;
    }
    let rest = t % LANES_T;
    if rest >= MIN_REST {
        t
    } else {
        t - rest
    }
}

/// The first [`tokens_for`]`(t)` tokens of a quantised batch, interleaved for the kernel.
/// Token `i` is lane `i % 16` of chunk `i / 16`; the lanes past the last token are zero.
#[derive(Clone, Debug, Default)]
pub(crate) struct Lanes {
    /// Tokens held.
    t: usize,
    /// Blocks per token.
    nb: usize,
    /// `[chunk][block][group of 4][lane][4]`: the signed activations.
    q: Vec<i8>,
    /// The same, plus 128, unsigned (`q8_0`).
    qu: Vec<u8>,
    /// `[chunk][block][lane]`: the scale, `d * sum(q)`, and `-8 * sum(q)`.
    d: Vec<f32>,
    s: Vec<f32>,
    off: Vec<i32>,
}

impl Lanes {
    /// Tokens `0 .. t` of `x` (`nb` blocks each).
    pub(crate) fn build(x: &QActs, t: usize, nb: usize) -> Lanes {
        let chunks = t.div_ceil(LANES_T);
        let mut l = Lanes {
            t,
            nb,
            q: vec![0; chunks * nb * QK * LANES_T],
            qu: vec![0x80; chunks * nb * QK * LANES_T],
            d: vec![0.0; chunks * nb * LANES_T],
            s: vec![0.0; chunks * nb * LANES_T],
            off: vec![0; chunks * nb * LANES_T],
        };
        for i in 0..t {
            let a = x.token(i);
            let (c, lane) = (i / LANES_T, i % LANES_T);
            let held = nb.min(a.d.len()).min(a.s.len()).min(a.qsum.len()).min(a.q.len() / QK);
            for b in 0..held {
                let at = (c * nb + b) * LANES_T + lane;
                l.d[at] = a.d[b];
                l.s[at] = a.s[b];
                l.off[at] = a.qsum[b].wrapping_mul(-8);
                for (g, four) in a.q[b * QK..(b + 1) * QK].chunks_exact(4).enumerate() {
                    let to = (((c * nb + b) * 8 + g) * LANES_T + lane) * 4;
                    l.q[to..to + 4].copy_from_slice(four);
                    for (u, v) in l.qu[to..to + 4].iter_mut().zip(four) {
                        *u = (*v as u8) ^ 0x80;
                    }
                }
            }
        }
        l
    }

    /// Tokens held.
    pub(crate) fn tokens(&self) -> usize {
        self.t
    }

    /// Chunks of [`LANES_T`] tokens held.
    pub(crate) fn chunks(&self) -> usize {
        self.t.div_ceil(LANES_T)
    }
}

/// Whether [`dot_lanes`] runs for rows of `dtype` that are `row_len` bytes long.
pub(crate) fn applies(dtype: DType, row_len: usize, lanes: &Lanes) -> bool {
    available() && matches!(dtype, DType::Q8_0 | DType::Q4_0 | DType::Q4_1) && row_len >= lanes.nb * dtype.block_bytes()
}

/// `put(i, dot(dtype, row, token i))` for the tokens `i` of chunks `chunks` of `lanes`, bitwise
/// [`qdot::dot`](super::qdot::dot). Returns false (and does nothing) unless [`applies`].
pub(crate) fn dot_lanes(
    dtype: DType,
    row: &[u8],
    lanes: &Lanes,
    chunks: std::ops::Range<usize>,
    mut put: impl FnMut(usize, f32),
) -> bool {
    if !applies(dtype, row.len(), lanes) {
        return false;
    }
    let (mut c, chunks) = (chunks.start, chunks.end.min(lanes.chunks()));
    while c < chunks {
        let two = c + 1 < chunks;
        let mut out = [[0.0f32; LANES_T]; 2];
        macro_rules! run {
            ($c:literal, $d:literal) => {
                // SAFETY: `available` checked the features; `row` holds `nb` blocks of the dtype
                // `$d` names (checked above); `lanes` holds chunks `c .. c + $c` of `nb` blocks
                // (`c + $c <= chunks`).
                unsafe { kernel::<$c, $d>(row.as_ptr(), lanes, c, &mut out) }
            };
        }
        match (two, dtype) {
            (true, DType::Q8_0) => run!(2, 0),
            (true, DType::Q4_0) => run!(2, 1),
            (true, _) => run!(2, 2),
            (false, DType::Q8_0) => run!(1, 0),
            (false, DType::Q4_0) => run!(1, 1),
            (false, _) => run!(1, 2),
        }
        for (k, o) in out.iter().enumerate().take(if two { 2 } else { 1 }) {
            for (lane, v) in o.iter().enumerate() {
                let i = (c + k) * LANES_T + lane;
                if i < lanes.t {
                    put(i, *v);
                }
            }
        }
        c += if two { 2 } else { 1 };
    }
    true
}

/// Chunks `c0 .. c0 + C` of `lanes` against one row of blocks of type `D` (0 `q8_0`, 1 `q4_0`,
/// 2 `q4_1`): `out[k][lane]`, in the order the module documents. Even blocks are taken in one
/// pass, odd ones in a second (the two accumulators are independent), so that `C` chunks need
/// `8 * C` accumulators.
///
/// Safety: AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C are available; `row` points at `lanes.nb`
/// blocks of the type; `lanes` holds chunks up to `c0 + C`.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn kernel<const C: usize, const D: u8>(row: *const u8, lanes: &Lanes, c0: usize, out: &mut [[f32; LANES_T]; 2]) {
    let nb = lanes.nb;
    let bb = match D {
        0 => DType::Q8_0.block_bytes(),
        1 => DType::Q4_0.block_bytes(),
        _ => DType::Q4_1.block_bytes(),
    };
    debug_assert!(C <= 2 && lanes.q.len() >= (c0 + C) * nb * QK * LANES_T && lanes.d.len() >= (c0 + C) * nb * LANES_T);
    let f16 = |p: *const u8| {
        // SAFETY: `p` points at two bytes inside a block (callers below).
        half::f16::from_bits(u16::from_le(unsafe { std::ptr::read_unaligned(p.cast::<u16>()) })).to_f32()
    };
    // SAFETY: reads of block `b < nb` of `row` at offsets inside the block; reads of
    // `lanes.q`/`qu` at `((c * nb + b) * 8 + g) * 64 .. + 64` and of `lanes.d`/`s`/`off` at
    // `(c * nb + b) * 16 .. + 16` for `c < c0 + C`, `b < nb`, `g < 8`: inside the lengths the
    // caller guarantees. Writes into `out` and local arrays; the rest are register intrinsics.
    unsafe {
        let zero = _mm512_setzero_ps();
        let mut even = [[zero; 8]; C];
        let mut sums = [[zero; 8]; C];
        let mut mins = [[zero; 2]; C];
        for par in 0..2 {
            let mut acc = [[zero; 8]; C];
            let mut b = par;
            while b < nb {
                let blk = row.add(b * bb);
                let dw = _mm512_set1_ps(f16(blk));
                // The block's 32 weights as bytes (q8_0: signed; q4: the unsigned nibbles), and
                // for q8_0 each group's `-128 * sum(w)`.
                let w = if D == 0 {
                    _mm256_loadu_si256(blk.add(2).cast())
                } else {
                    let raw = _mm256_broadcastsi128_si256(_mm_loadu_si128(blk.add(bb - QK / 2).cast()));
                    _mm256_and_si256(_mm256_srlv_epi64(raw, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(0x0f))
                };
                let mut wg = [0i32; 8];
                _mm256_storeu_si256(wg.as_mut_ptr().cast(), w);
                let mut init = [0i32; 8];
                if D == 0 {
                    let g = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(-128), w);
                    _mm256_storeu_si256(init.as_mut_ptr().cast(), _mm256_sub_epi32(_mm256_setzero_si256(), g));
                }
                let mw = if D == 2 { _mm512_set1_ps(f16(blk.add(2))) } else { zero };
                for (k, acc) in acc.iter_mut().enumerate() {
                    let base = (c0 + k) * nb + b;
                    let s = _mm512_mul_ps(dw, _mm512_loadu_ps(lanes.d.as_ptr().add(base * LANES_T)));
                    for (g, a) in acc.iter_mut().enumerate() {
                        let at = (base * 8 + g) * LANES_T * 4;
                        let wv = _mm512_set1_epi32(wg[g]);
                        let p = if D == 0 {
                            let u = _mm512_loadu_si512(lanes.qu.as_ptr().add(at).cast());
                            _mm512_dpbusd_epi32(_mm512_set1_epi32(init[g]), u, wv)
                        } else {
                            let x = _mm512_loadu_si512(lanes.q.as_ptr().add(at).cast());
                            let start = if D == 1 && g == 0 {
                                _mm512_loadu_si512(lanes.off.as_ptr().add(base * LANES_T).cast())
                            } else {
                                _mm512_setzero_si512()
                            };
                            _mm512_dpbusd_epi32(start, wv, x)
                        };
                        *a = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(p), *a);
                    }
                    if D == 2 {
                        let sv = _mm512_loadu_ps(lanes.s.as_ptr().add(base * LANES_T));
                        mins[k][par] = _mm512_add_ps(mins[k][par], _mm512_mul_ps(mw, sv));
                    }
                }
                b += 2;
            }
            for k in 0..C {
                for g in 0..8 {
                    if par == 0 {
                        even[k][g] = acc[k][g];
                    } else {
                        sums[k][g] = _mm512_add_ps(even[k][g], acc[k][g]);
                    }
                }
            }
        }
        for k in 0..C {
            let v = &sums[k];
            let s1: [__m512; 4] = std::array::from_fn(|i| _mm512_add_ps(v[i], v[i + 4]));
            let s2 = [_mm512_add_ps(s1[0], s1[2]), _mm512_add_ps(s1[1], s1[3])];
            let s3 = _mm512_add_ps(s2[0], s2[1]);
            let r = _mm512_add_ps(s3, _mm512_add_ps(mins[k][0], mins[k][1]));
            _mm512_storeu_ps(out[k].as_mut_ptr(), r);
        }
    }
}
