//! Fast f32 kernels of the CPU engine (the plain versions they are tested against are in
//! [`super::reference`]).
//!
//! Determinism: every output element is computed by the same sequence of f32 operations whatever
//! the batch size (1 token or a prefill batch) and whatever the thread count, so batched prefill,
//! token-by-token decode and any `with_threads(n)` agree bitwise:
//!
//! - dot products use [`LANES`](dot::LANES) partial sums, element `k` going to lane `k % LANES` in
//!   increasing `k`, reduced by [`reduce`](dot::reduce) in a fixed tree; the batched micro-kernels
//!   keep exactly that order per (token, row); every multiply-add goes through
//!   [`madd`](dot::madd), fused (one rounding) when the build has FMA instructions
//!   ([`FUSED`](dot::FUSED): `x86-64-v3` builds, aarch64), so all paths of one build agree;
//! - `x @ W^T` is split across threads by output rows, the down projection by output columns,
//!   attention by (token, head): no sum is ever split between threads.
//!
//! The loops are plain Rust written to auto-vectorise (fixed-size lane arrays, no bounds checks in
//! the inner loops, no `unsafe`, no run-time dispatch), so their speed follows the build's target
//! features: NEON on aarch64 (phones) is the baseline; the workspace's desktop x86-64 builds target
//! `x86-64-v3` (AVX2, FMA, F16C; `.cargo/config.toml`), where they run 1.2-1.7x faster per core
//! than in a baseline SSE2 build (`kernel_speed`). [`crate::cpu::simd_features`] names the features
//! of the running build.
//!
//! f16 weights: a one-input product (decode) never materialises f32 rows. It reads each f16's bits
//! as an f32 scaled by `2^-112` ([`f16_bits_unscaled`](crate::cpu::weights::f16_bits_unscaled): a
//! shift and a mask) and folds the `2^112` into the input, which is scaled once per call:
//! `(x * 2^112) * (w / 2^112)` is the same real number as `x * w`, rounded once, so the result is
//! bitwise the product with the exactly widened weight, at about a third of the instructions of a separate
//! conversion. The scaling is exact while `|x| < 2^16` ([`PRESCALE_LIMIT`](dot::PRESCALE_LIMIT));
//! larger inputs multiply each weight by `2^112` instead (still exact). Infinite or NaN weights are
//! detected on the way (the running maximum of the exponent bits) and the row is recomputed with
//! exactly widened weights, as the batched paths always use. (This relies on IEEE subnormals, the
//! default on x86-64 and aarch64: a host that sets flush-to-zero would flush the scaled subnormal
//! weights; `f16_paths_equal_widened_f32_bitwise` checks it.)
//!
//! The one-input down projection adds [`DOWN_ROWS`](matmul::DOWN_ROWS) f16 rows per pass over its
//! output chunk (a register block of `y`), reading the rows in place. When the build has f16
//! conversion instructions ([`HW_F16`](dot::HW_F16): x86-64 with F16C, as in `x86-64-v3` builds)
//! both one-input products widen the weights exactly instead (one conversion per vector, no
//! infinity/NaN check): same values, same order. Within one build, every path computes the same
//! sequence of f32 operations.
//!
//! Block-quantised weights (`q8_0`, `q4_0`, `q4_1`): `x @ W^T` quantises `x` to 8 bits per
//! 32-element block once per product and takes integer dot products ([`qdot`]: explicit
//! `std::arch` AVX2 / NEON `sdot` kernels chosen at run time, behind safe wrappers, each tested
//! against its scalar reference), one per (token, row) whatever the batch, so the invariances
//! above hold for quantised files too. The down projection dequantises its rows and adds them
//! exactly as the f32 path does. A prefill batch's down projection (from
//! [`TILED_MIN_T`](matmul::TILED_MIN_T) inputs, x86-64 with AVX-512 or AVX2) widens each
//! group's rows once per 32 output columns and accumulates eight inputs by 32 columns (AVX2:
//! six inputs by 16 columns) in registers ([`tiled`]): the same operations per output, so the
//! same bits. Likewise a batch's `x @ W^T` on f16 or f32 rows (from
//! [`DOT_MIN_T`](tiled::DOT_MIN_T) inputs): four widened rows by three inputs, each product's
//! 32 lanes in registers (AVX2: a quarter of them at a time, over 512-column chunks), summed by
//! [`reduce`](dot::reduce). A batch's block-quantised `x @ W^T` from 16 inputs on AVX-512 VNNI
//! puts sixteen tokens in the lanes of each vector, and from 8 inputs on AVX2 eight
//! ([`qlanes`]): one weight block's unpacking and scale serve every token of a chunk, and each
//! lane runs the one-token kernel's integer sums and f32 operations, so the same bits.
//!
//! Threads: the parallel kernels hand items to a persistent pool of workers
//! ([`worker_pool`](pool::worker_pool)) rather than spawning threads per product.

mod dot;
mod matmul;
mod ops;
mod pool;
pub(crate) mod qdot;
#[cfg(target_arch = "x86_64")]
mod qlanes;
#[cfg(test)]
mod qtests;
#[cfg(test)]
mod speed;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod tiled;

pub(crate) use dot::add_assign;
pub(crate) use matmul::{matmul, matmul_down, matmul_many};
pub(crate) use ops::{attend, gelu_tanh, layer_norm, rms_norm, rope, rope_angles, silu};
pub(crate) use pool::{par_units, with_workers};
