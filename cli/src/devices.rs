//! `matformer devices`: GPU adapters, their limits and the weight paths chosen.

use anyhow::Result;
use matformer_export::progress::human_bytes;

use crate::common::print_json;

/// `matformer devices`.
pub fn run(json: bool) -> Result<()> {
    // Opens each adapter and times the decode GEMV on each weight path (a fraction of a second).
    let adapters = matformer::gpu::probe_adapters();
    if json {
        return print_json(&adapters);
    }
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!("CPU engine: {threads} threads, kernels compiled for {}", matformer::cpu::simd_features());
    if adapters.is_empty() {
        println!("no GPU adapter found: `--backend auto` will use the CPU engine");
        return Ok(());
    }
    for a in &adapters {
        println!("{} ({} {}, driver {})", a.name, a.backend, a.device_type, a.driver);
        println!(
            "  max storage binding {}, max buffer {}, workgroup storage {} B, invocations/workgroup {}, storage buffers/stage {}",
            human_bytes(a.max_storage_buffer_binding_size),
            human_bytes(a.max_buffer_size),
            a.max_compute_workgroup_storage_size,
            a.max_compute_invocations_per_workgroup,
            a.max_storage_buffers_per_shader_stage
        );
        println!(
            "  shader-f16 {}, shader-int64 {}, subgroups {}, weight paths available: {}",
            a.shader_f16,
            a.shader_int64,
            a.subgroups,
            a.weight_paths.join(", ")
        );
        for t in &a.gemv_timings {
            println!(
                "  decode GEMV {} x {} on the {} path: {:.3} ms ({:.2} GB/s)",
                t.rows, t.cols, t.path, t.gemv_ms, t.read_gb_per_s
            );
        }
        println!("  weight path: {} ({})", a.weight_path, a.weight_path_reason);
    }
    Ok(())
}
