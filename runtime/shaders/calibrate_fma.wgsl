// Calibration: arithmetic throughput. Each invocation runs `iterations` rounds of fma on 8
// independent vec4<f32> accumulators (8 * 4 fma = 64 flops per round, no dependency between
// accumulators within a round) and writes their sum to out[g], so no round can be dropped.
// Starting values depend on the invocation index and the round count comes from the uniform,
// so nothing folds at compile time. 1-D grid.

const WG: u32 = 64u;

struct Params {
    iterations: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let x = f32(gid.x & 1023u) * 1e-6;
    let b = vec4<f32>(0.9999, 0.99991, 0.99992, 0.99993) - vec4<f32>(x);
    let c = vec4<f32>(1e-4, 2e-4, 3e-4, 4e-4) + vec4<f32>(x);
    var a0 = vec4<f32>(x, x + 0.1, x + 0.2, x + 0.3);
    var a1 = a0 + vec4<f32>(1.0);
    var a2 = a0 + vec4<f32>(2.0);
    var a3 = a0 + vec4<f32>(3.0);
    var a4 = a0 + vec4<f32>(4.0);
    var a5 = a0 + vec4<f32>(5.0);
    var a6 = a0 + vec4<f32>(6.0);
    var a7 = a0 + vec4<f32>(7.0);
    for (var i = 0u; i < p.iterations; i++) {
        a0 = fma(a0, b, c);
        a1 = fma(a1, b, c);
        a2 = fma(a2, b, c);
        a3 = fma(a3, b, c);
        a4 = fma(a4, b, c);
        a5 = fma(a5, b, c);
        a6 = fma(a6, b, c);
        a7 = fma(a7, b, c);
    }
    let s = (a0 + a1) + (a2 + a3) + (a4 + a5) + (a6 + a7);
    out[gid.x] = s.x + s.y + s.z + s.w;
}
