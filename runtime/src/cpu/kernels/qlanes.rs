//! A prefill batch's block-quantised `x @ W^T` with the tokens in the vector lanes, x86-64
//! only: sixteen tokens per 512-bit vector on AVX-512 VNNI, eight per 256-bit vector on AVX2.
//!
//! The row-by-token kernels of [`qdot`](super::qdot) spend, per (row, token) and block, the
//! integer products and then a conversion, a multiply and a multiply-add on each group of four
//! products, plus the unpacking of every block's nibbles for each row, the broadcasting of
//! every token's scales and the block's scale product. Here a vector holds sixteen (or eight)
//! tokens: each 4-byte group of a weight block is broadcast to all lanes once and multiplied
//! with the tokens' four matching activation bytes (laid out for it once per product by
//! [`Lanes::build`]), so one block's unpacking and scale serve every token of a chunk.
//! AVX-512 takes the products with `vpdpbusd`; AVX2 with `vpmaddubsw` and `vpmaddwd` on the row
//! unpacked once per call into bytes (`q8_0`: the weights' magnitudes against the activations
//! with the weights' signs, `vpsignb`, exact since activations stay within `-127..=127`).
//!
//! The results are bitwise [`qdot::dot`](super::qdot::dot)'s. That kernel's order, per
//! (row, token): lane `g` (of eight) of a block `b` gets the integer sum of the four products
//! of positions `4g .. 4g + 4` (for `q4_0`, lane 0 also `-8 * sum(q)`), converted to f32 and
//! multiply-added with the block's scale `dw * dx` into accumulator `(g, b % 2)`; then
//! `v_g = even_g + odd_g`, summed in `hsum`'s tree (`(v0 + v4) + (v2 + v6)` and
//! `(v1 + v5) + (v3 + v7)`, added), plus the `q4_1` minimum terms `(mins0 + mins1)`. Here lane
//! `i` of accumulator `(g, parity)` is exactly that accumulator of token `i`: the integers are
//! the same integers (for `q8_0` on AVX-512 the activations enter as `q + 128` against the
//! signed weights, the group's `-128 * sum(w)` starting the sum), and the f32 operations the
//! same, in the same order.

use std::arch::x86_64::*;

use super::qdot::QActs;
use crate::format::{DType, QK};

/// Tokens per vector on AVX-512 (sixteen i32 or f32 lanes).
pub(crate) const LANES_T: usize = 16;

/// Tokens per vector on AVX2 (eight lanes).
pub(crate) const LANES_T2: usize = 8;

/// Fewest tokens in a last, partly filled, chunk that are still worth sixteen lanes of work:
/// fewer go through the row-by-token kernels. Measured (small_batch_speed, 8192 x 2048, two
/// threads, ms per product, row-by-token / token-lane): q4_0 at 5 tokens 1.43 / 2.40, 8
/// tokens 2.20 / 2.46, 10 tokens 2.28 / 2.19, 13 tokens 2.25 / 2.22; q8_0 at 8 tokens
/// 2.51 / 2.94, 10 tokens 2.67 / 2.62.
pub(crate) const MIN_REST: usize = 10;

/// [`MIN_REST`] for the eight lanes of AVX2.
pub(crate) const MIN_REST2: usize = 5;

/// Tokens per vector of the kernel this CPU runs: 16 with AVX-512 F/BW/VL and VNNI, 8 with
/// AVX2, FMA and F16C and no AVX-512, 0 otherwise (AVX-512 without VNNI keeps its four-row by
/// four-token kernel, which the AVX2 lanes were not measured against).
pub(crate) fn width() -> usize {
    #[cfg(test)]
    if OFF.load(std::sync::atomic::Ordering::Relaxed) {
        return 0;
    }
    if super::qdot::x86::has_avx512_vnni() {
        LANES_T
    } else if super::qdot::x86::available() && !super::qdot::x86::has_avx512() {
        LANES_T2
    } else {
        0
    }
}

/// Turns the kernel off for the products quantised after it is set: only the ignored speed
/// comparison in `speed.rs` sets it, which is to be run alone (other tests running beside it
/// would see the kernel come and go).
#[cfg(test)]
pub(crate) static OFF: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the kernel runs on this CPU.
#[cfg(test)]
pub(crate) fn available() -> bool {
    width() > 0
}

/// How many of a batch's `t` tokens go through this kernel: whole chunks of [`width`], and a
/// last partial chunk of at least [`MIN_REST`] (AVX2: [`MIN_REST2`]) tokens; 0 when the kernel
/// does not run here.
pub(crate) fn tokens_for(t: usize) -> usize {
    let (w, min) = match width() {
        LANES_T => (LANES_T, MIN_REST),
        LANES_T2 => (LANES_T2, MIN_REST2),
        _ => return 0,
    };
    let rest = t % w;
    if rest >= min {
        t
    } else {
        t - rest
    }
}

/// The first [`tokens_for`]`(t)` tokens of a quantised batch, interleaved for the kernel.
/// Token `i` is lane `i % w` of chunk `i / w` (`w` the [`width`]); the lanes past the last
/// token are zero.
#[derive(Clone, Debug, Default)]
pub(crate) struct Lanes {
    /// Tokens held.
    t: usize,
    /// Tokens per chunk: [`LANES_T`] or [`LANES_T2`].
    w: usize,
    /// Blocks per token.
    nb: usize,
    /// `[chunk][block][group of 4][lane][4]`: the signed activations.
    q: Vec<i8>,
    /// The same, plus 128, unsigned (`q8_0` on AVX-512; empty on AVX2).
    qu: Vec<u8>,
    /// `[chunk][block][lane]`: the scale, `d * sum(q)`, and `-8 * sum(q)`.
    d: Vec<f32>,
    s: Vec<f32>,
    off: Vec<i32>,
}

impl Lanes {
    /// Tokens `0 .. t` of `x` (`nb` blocks each), for the kernel of this CPU ([`width`]).
    pub(crate) fn build(x: &QActs, t: usize, nb: usize) -> Lanes {
        Lanes::build_for(x, t, nb, if width() == LANES_T { LANES_T } else { LANES_T2 })
    }

    /// [`Lanes::build`] with `w` tokens per chunk ([`LANES_T`] or [`LANES_T2`]).
    fn build_for(x: &QActs, t: usize, nb: usize, w: usize) -> Lanes {
        let chunks = t.div_ceil(w);
        let unsigned = w == LANES_T;
        let mut l = Lanes {
            t,
            w,
            nb,
            q: vec![0; chunks * nb * QK * w],
            qu: if unsigned { vec![0x80; chunks * nb * QK * w] } else { Vec::new() },
            d: vec![0.0; chunks * nb * w],
            s: vec![0.0; chunks * nb * w],
            off: vec![0; chunks * nb * w],
        };
        for i in 0..t {
            let a = x.token(i);
            let (c, lane) = (i / w, i % w);
            let held = nb.min(a.d.len()).min(a.s.len()).min(a.qsum.len()).min(a.q.len() / QK);
            for b in 0..held {
                let at = (c * nb + b) * w + lane;
                l.d[at] = a.d[b];
                l.s[at] = a.s[b];
                l.off[at] = a.qsum[b].wrapping_mul(-8);
                for (g, four) in a.q[b * QK..(b + 1) * QK].chunks_exact(4).enumerate() {
                    let to = (((c * nb + b) * 8 + g) * w + lane) * 4;
                    l.q[to..to + 4].copy_from_slice(four);
                    if unsigned {
                        for (u, v) in l.qu[to..to + 4].iter_mut().zip(four) {
                            *u = (*v as u8) ^ 0x80;
                        }
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

    /// Chunks of tokens held.
    pub(crate) fn chunks(&self) -> usize {
        self.t.div_ceil(self.w.max(1))
    }

    /// Tokens per chunk.
    pub(crate) fn width(&self) -> usize {
        self.w
    }
}

/// Fewest tokens for `q8_0` on AVX2: its products need `vpsignb` on every group as well, and
/// pay only from two whole chunks (token_lane_speed, 8192 x 2048, token-lane against
/// row-by-token, one / two threads: 8 tokens 0.96x / 0.95x, 13 tokens 0.91x / 0.90x, 16
/// tokens 1.10x / 1.09x, 64 tokens 1.08x / 1.14x).
pub(crate) const MIN_Q8_TOKENS2: usize = 16;

/// Whether [`dot_lanes`] runs for rows of `dtype` that are `row_len` bytes long.
pub(crate) fn applies(dtype: DType, row_len: usize, lanes: &Lanes) -> bool {
    let cpu = match lanes.w {
        LANES_T => super::qdot::x86::has_avx512_vnni(),
        LANES_T2 => {
            super::qdot::x86::available()
                && !super::qdot::x86::has_avx512()
                && (dtype != DType::Q8_0 || lanes.t >= MIN_Q8_TOKENS2)
        }
        _ => false,
    };
    cpu && matches!(dtype, DType::Q8_0 | DType::Q4_0 | DType::Q4_1) && row_len >= lanes.nb * dtype.block_bytes()
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
    if lanes.w == LANES_T2 {
        dot_lanes2(dtype, row, lanes, chunks, put);
        return true;
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

thread_local! {
    /// [`dot_lanes2`]'s unpacked row, kept per thread so that no call clears or allocates it.
    static UNPACKED: std::cell::RefCell<(Vec<u8>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// [`dot_lanes`] on AVX2: the row is unpacked once ([`kernel2`]), then taken against every chunk.
fn dot_lanes2(dtype: DType, row: &[u8], lanes: &Lanes, chunks: std::ops::Range<usize>, put: impl FnMut(usize, f32)) {
    UNPACKED.with(|u| match u.try_borrow_mut() {
        Ok(mut u) => {
            let (wbuf, sbuf) = &mut *u;
            dot_lanes2_in(dtype, row, lanes, chunks, put, wbuf, sbuf)
        }
        // Only reachable if `put` itself ran a product on this thread.
        Err(_) => dot_lanes2_in(dtype, row, lanes, chunks, put, &mut Vec::new(), &mut Vec::new()),
    })
}

fn dot_lanes2_in(
    dtype: DType,
    row: &[u8],
    lanes: &Lanes,
    chunks: std::ops::Range<usize>,
    mut put: impl FnMut(usize, f32),
    wbuf: &mut Vec<u8>,
    sbuf: &mut Vec<f32>,
) {
    let nb = lanes.nb;
    let (c0, c1) = (chunks.start.min(lanes.chunks()), chunks.end.min(lanes.chunks()));
    if c0 >= c1 {
        return;
    }
    if wbuf.len() < 2 * QK * nb {
        wbuf.resize(2 * QK * nb, 0);
    }
    if sbuf.len() < 2 * nb {
        sbuf.resize(2 * nb, 0.0);
    }
    let mut out = [0.0f32; LANES_T2];
    for c in c0..c1 {
        macro_rules! run {
            ($d:literal) => {
                // SAFETY: `applies` checked AVX2, FMA and F16C and that `row` holds `nb` blocks
                // of the dtype `$d` names; `lanes` holds chunk `c < lanes.chunks()` of `nb`
                // blocks of width `LANES_T2`; `wbuf` and `sbuf` hold `2 * 32 * nb` bytes and
                // `2 * nb` values.
                unsafe { kernel2::<$d>(row.as_ptr(), lanes, c, c == c0, wbuf, sbuf, &mut out) }
            };
        }
        match dtype {
            DType::Q8_0 => run!(0),
            DType::Q4_0 => run!(1),
            _ => run!(2),
        }
        for (lane, v) in out.iter().enumerate() {
            let i = c * LANES_T2 + lane;
            if i < lanes.t {
                put(i, *v);
            }
        }
    }
}

/// Chunk `c` of `lanes` (eight tokens) against one row of blocks of type `D` (0 `q8_0`, 1
/// `q4_0`, 2 `q4_1`): `out[lane]`, in the order the module documents. When `unpack`, the row's
/// blocks are first written to `wbuf` as bytes (`[block][64]`: `q8_0` its 32 signed weights and
/// their 32 magnitudes; `q4` the 32 nibbles in position order) and their scales (and `q4_1`
/// minima) to `sbuf` (`[block][2]`); otherwise `wbuf` and `sbuf` hold that row already. Even
/// blocks are taken in one pass and odd ones in a second, so that eight accumulators suffice.
///
/// Safety: AVX2, FMA and F16C are available; `row` points at `lanes.nb` blocks of the type;
/// `lanes` has width `LANES_T2` and holds chunk `c`; `wbuf` and `sbuf` hold at least
/// `64 * nb` bytes and `2 * nb` values.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn kernel2<const D: u8>(
    row: *const u8,
    lanes: &Lanes,
    c: usize,
    unpack: bool,
    wbuf: &mut [u8],
    sbuf: &mut [f32],
    out: &mut [f32; LANES_T2],
) {
    const W: usize = LANES_T2;
    let nb = lanes.nb;
    let bb = match D {
        0 => DType::Q8_0.block_bytes(),
        1 => DType::Q4_0.block_bytes(),
        _ => DType::Q4_1.block_bytes(),
    };
    debug_assert!(
        lanes.w == W
            && lanes.q.len() >= (c + 1) * nb * QK * W
            && lanes.d.len() >= (c + 1) * nb * W
            && wbuf.len() >= 2 * QK * nb
            && sbuf.len() >= 2 * nb
    );
    let f16 = |p: *const u8| {
        // SAFETY: `p` points at two bytes inside a block (callers below).
        half::f16::from_bits(u16::from_le(unsafe { std::ptr::read_unaligned(p.cast::<u16>()) })).to_f32()
    };
    // SAFETY: reads of block `b < nb` of `row` at offsets inside the block; reads and writes of
    // `wbuf` at `64 * b .. 64 * b + 64` and of `sbuf` at `2 * b .. 2 * b + 2` for `b < nb`;
    // reads of `lanes.q` at `((c * nb + b) * 8 + g) * 32 .. + 32` and of `lanes.d`/`s`/`off`
    // at `(c * nb + b) * 8 .. + 8` for `b < nb`, `g < 8`: inside the lengths the caller
    // guarantees. Writes into `out`; the rest are register intrinsics.
    unsafe {
        let wp = wbuf.as_mut_ptr();
        if unpack {
            for b in 0..nb {
                let blk = row.add(b * bb);
                sbuf[2 * b] = f16(blk);
                if D == 2 {
                    sbuf[2 * b + 1] = f16(blk.add(2));
                }
                let to = wp.add(64 * b);
                if D == 0 {
                    let w = _mm256_loadu_si256(blk.add(2).cast());
                    _mm256_storeu_si256(to.cast(), w);
                    _mm256_storeu_si256(to.add(QK).cast(), _mm256_abs_epi8(w));
                } else {
                    let raw = _mm_loadu_si128(blk.add(bb - QK / 2).cast());
                    let m = _mm_set1_epi8(0x0f);
                    _mm_storeu_si128(to.cast(), _mm_and_si128(raw, m));
                    _mm_storeu_si128(to.add(QK / 2).cast(), _mm_and_si128(_mm_srli_epi16(raw, 4), m));
                }
            }
        }
        let wp = wp as *const u8;
        // One pass per parity, each its own function: the even pass's eight sums wait in
        // memory rather than in registers the odd pass's accumulators need (inlined, LLVM kept
        // five of them in registers and spilled an accumulator, a store-load chain per block).
        let (even, mins0) = pass2::<D>(wp, sbuf, lanes, c, 0);
        let (odd, mins1) = pass2::<D>(wp, sbuf, lanes, c, 1);
        let sums: [__m256; 8] = std::array::from_fn(|g| _mm256_add_ps(even[g], odd[g]));
        let mins = [mins0, mins1];
        let v = &sums;
        let s1: [__m256; 4] = std::array::from_fn(|i| _mm256_add_ps(v[i], v[i + 4]));
        let s2 = [_mm256_add_ps(s1[0], s1[2]), _mm256_add_ps(s1[1], s1[3])];
        let s3 = _mm256_add_ps(s2[0], s2[1]);
        let r = _mm256_add_ps(s3, _mm256_add_ps(mins[0], mins[1]));
        _mm256_storeu_ps(out.as_mut_ptr(), r);
    }
}

/// One parity's pass of [`kernel2`]: blocks `par, par + 2, ...` of chunk `c`, the eight
/// accumulators and the `q4_1` minimum terms.
///
/// Safety: as [`kernel2`]'s, with `wbuf` (`wp`) and `sbuf` holding the unpacked row.
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pass2<const D: u8>(
    wp: *const u8,
    sbuf: &[f32],
    lanes: &Lanes,
    c: usize,
    par: usize,
) -> ([__m256; 8], __m256) {
    const W: usize = LANES_T2;
    let nb = lanes.nb;
    debug_assert!(sbuf.len() >= 2 * nb && lanes.q.len() >= (c + 1) * nb * QK * W);
    // SAFETY: reads of `wp[64 * b .. 64 * b + 64]` and `sbuf[2 * b .. 2 * b + 2]` for `b < nb`
    // (the caller's unpacked row), of `lanes.q` at `((c * nb + b) * 8 + g) * 32 .. + 32` and of
    // `lanes.d`/`s`/`off` at `(c * nb + b) * 8 .. + 8` for `b < nb`, `g < 8` (chunk `c` held);
    // the rest are register intrinsics.
    unsafe {
        let zero = _mm256_setzero_ps();
        let ones = _mm256_set1_epi16(1);
        let mut acc = [zero; 8];
        let mut mins = zero;
        let mut b = par;
        while b < nb {
            let base = c * nb + b;
            let wb = wp.add(64 * b);
            let s = _mm256_mul_ps(
                _mm256_set1_ps(*sbuf.get_unchecked(2 * b)),
                _mm256_loadu_ps(lanes.d.as_ptr().add(base * W)),
            );
            for (g, a) in acc.iter_mut().enumerate() {
                let x = _mm256_loadu_si256(lanes.q.as_ptr().add((base * 8 + g) * W * 4).cast());
                let four = |p: *const u8| _mm256_set1_epi32(std::ptr::read_unaligned(p.cast::<i32>()));
                let p16 = if D == 0 {
                    _mm256_maddubs_epi16(four(wb.add(QK + 4 * g)), _mm256_sign_epi8(x, four(wb.add(4 * g))))
                } else {
                    _mm256_maddubs_epi16(four(wb.add(4 * g)), x)
                };
                let mut p = _mm256_madd_epi16(p16, ones);
                if D == 1 && g == 0 {
                    p = _mm256_add_epi32(p, _mm256_loadu_si256(lanes.off.as_ptr().add(base * W).cast()));
                }
                *a = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(p), *a);
            }
            if D == 2 {
                let sv = _mm256_loadu_ps(lanes.s.as_ptr().add(base * W));
                mins = _mm256_add_ps(mins, _mm256_mul_ps(_mm256_set1_ps(*sbuf.get_unchecked(2 * b + 1)), sv));
            }
            b += 2;
        }
        (acc, mins)
    }
}
