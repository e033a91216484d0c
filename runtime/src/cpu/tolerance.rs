//! Named numerical tolerances for comparing an implementation against a reference.
//!
//! Every comparison in the test suites (fast kernel vs scalar reference, engine vs dense
//! reference forward, and later GPU vs CPU) uses one of these tiers, so a loosened bound is
//! visible in one place instead of as a magic number in a test.

use std::fmt;

/// `|actual - expected| <= abs + rel * |expected|`, elementwise. NaN never compares equal
/// (except to a NaN in the expected output) and lengths must match.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    /// Tier name, shown in mismatch reports.
    pub name: &'static str,
    /// Absolute slack.
    pub abs: f32,
    /// Slack relative to the expected value's magnitude.
    pub rel: f32,
}

impl Tolerance {
    /// Bitwise-identical results (same arithmetic in the same order): batched vs token-by-token
    /// evaluation and 1 vs N threads of the CPU engine.
    pub const EXACT: Tolerance = Tolerance { name: "exact", abs: 0.0, rel: 0.0 };

    /// One f32 kernel (dot product, norm, RoPE, attention of a few hundred elements) against
    /// its scalar f64-accumulating reference: only summation order and rounding differ.
    pub const KERNEL: Tolerance = Tolerance { name: "kernel", abs: 2e-5, rel: 2e-5 };

    /// A whole forward pass in f32 (a few layers) against a plain dense reference forward on
    /// the same (f16-decoded) weights: rounding differences accumulate over layers.
    pub const FORWARD_F32: Tolerance = Tolerance { name: "forward_f32", abs: 2e-4, rel: 1e-3 };

    /// Reduced-precision arithmetic (f16 storage of activations or f16 accumulation, as GPU
    /// backends may do) against the f32 CPU engine.
    pub const REDUCED_PRECISION: Tolerance = Tolerance { name: "reduced_precision", abs: 2e-2, rel: 2e-2 };

    /// Allowed difference around `expected`.
    pub fn allowed(&self, expected: f32) -> f32 {
        self.abs + self.rel * expected.abs()
    }

    /// True when `actual` is within tolerance of `expected`.
    pub fn close(&self, expected: f32, actual: f32) -> bool {
        if expected.is_nan() || actual.is_nan() {
            return expected.is_nan() && actual.is_nan();
        }
        if expected == actual {
            // Also covers equal infinities.
            return true;
        }
        (actual - expected).abs() <= self.allowed(expected)
    }

    /// Compares two arrays elementwise; reports the first element out of tolerance (and the
    /// largest difference seen) or a length mismatch.
    pub fn check(&self, expected: &[f32], actual: &[f32]) -> Result<(), Mismatch> {
        if expected.len() != actual.len() {
            return Err(Mismatch {
                tolerance: *self,
                index: expected.len().min(actual.len()),
                expected: f32::NAN,
                actual: f32::NAN,
                max_abs_diff: f32::NAN,
                len: Some((expected.len(), actual.len())),
            });
        }
        let max_abs_diff = max_abs_diff(expected, actual);
        match expected.iter().zip(actual).position(|(&e, &a)| !self.close(e, a)) {
            None => Ok(()),
            Some(index) => Err(Mismatch {
                tolerance: *self,
                index,
                expected: expected[index],
                actual: actual[index],
                max_abs_diff,
                len: None,
            }),
        }
    }
}

/// Largest `|a - b|` over two arrays (NaN if any element is NaN; 0 for empty arrays; pairs
/// beyond the shorter array are ignored).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0.0f32, |m, (&x, &y)| {
        let d = (x - y).abs();
        if d.is_nan() || m.is_nan() {
            f32::NAN
        } else {
            m.max(d)
        }
    })
}

/// First out-of-tolerance element found by [`Tolerance::check`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mismatch {
    /// The tier that was violated.
    pub tolerance: Tolerance,
    /// Index of the first offending element.
    pub index: usize,
    /// Expected value there.
    pub expected: f32,
    /// Actual value there.
    pub actual: f32,
    /// Largest absolute difference over the whole arrays.
    pub max_abs_diff: f32,
    /// `(expected_len, actual_len)` when the lengths differ.
    pub len: Option<(usize, usize)>,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some((e, a)) = self.len {
            return write!(f, "length mismatch: expected {e} elements, got {a}");
        }
        write!(
            f,
            "outside tolerance {:?} (abs {:e}, rel {:e}) at index {}: expected {}, got {} (diff {:e}, allowed {:e}); max |diff| over the array {:e}",
            self.tolerance.name,
            self.tolerance.abs,
            self.tolerance.rel,
            self.index,
            self.expected,
            self.actual,
            (self.actual - self.expected).abs(),
            self.tolerance.allowed(self.expected),
            self.max_abs_diff
        )
    }
}

impl std::error::Error for Mismatch {}
