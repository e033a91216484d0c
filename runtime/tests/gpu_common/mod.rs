//! Shared by the GPU test files: what to do when no adapter exists.

use matformer::gpu::GpuError;

/// `Some(value)` on success; `None` (after printing why) when there is no adapter outside CI.
/// With `CI=true` a missing adapter fails the test: CI installs lavapipe, so the GPU tests
/// must run there. Any other error fails the test.
pub fn or_skip<T>(created: Result<T, GpuError>, what: &str) -> Option<T> {
    match created {
        Ok(v) => Some(v),
        Err(GpuError::NoAdapter { reason }) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("no GPU adapter in CI ({reason}): install mesa-vulkan-drivers (lavapipe)");
            }
            println!("skipping: no GPU adapter ({reason})");
            None
        }
        Err(e) => panic!("{what} creation failed: {e}"),
    }
}
