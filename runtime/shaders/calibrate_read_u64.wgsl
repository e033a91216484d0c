// Calibration: streaming read bandwidth with 64-bit loads (adapters with SHADER_INT64): the
// kernel of calibrate_read.wgsl with every load a vec4<u64> (32 bytes, four components instead
// of eight for the same bytes). On CPU adapters such as lavapipe a storage load costs per
// component, so this is the streaming ceiling of the packed64 decode GEMV. Same mappings
// (BLOCKED or strided) and sums: a unit is 8 u32 words (each u64 is two words, low first), and
// workgroup w writes the wrapping u32 sum of the words its invocations read.

override BLOCKED: bool = false;

const WG: u32 = 64u;

struct Params {
    // vec4<u64> units (32 bytes) in `data`.
    n: u32,
    // Invocations in the grid (workgroups * WG).
    threads: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> data: array<vec4<u64>>;
@group(0) @binding(2) var<storage, read_write> sums: array<u32>;

var<workgroup> partial: array<u32, WG>;

@compute @workgroup_size(WG)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
) {
    // Sums of the low and of the high 32-bit halves (as 64-bit sums, so no carry crosses).
    var lo = vec4<u64>(0lu);
    var hi = vec4<u64>(0lu);
    let mask = vec4<u64>(0xfffffffflu);
    if BLOCKED {
        let per = p.n / p.threads + select(0u, 1u, p.n % p.threads != 0u);
        let start = gid.x * per;
        let end = min(start + per, p.n);
        for (var i = start; i < end; i++) {
            let v = data[i];
            lo += v & mask;
            hi += v >> vec4<u32>(32u);
        }
    } else {
        for (var i = gid.x; i < p.n; i += p.threads) {
            let v = data[i];
            lo += v & mask;
            hi += v >> vec4<u32>(32u);
        }
    }
    // The wrapping u32 sum of every word read.
    let t = lo + hi;
    partial[lid.x] = u32((t.x + t.y + t.z + t.w) & 0xfffffffflu);
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if lid.x < k {
            partial[lid.x] += partial[lid.x + k];
        }
        workgroupBarrier();
    }
    if lid.x == 0u {
        sums[wid.x] = partial[0];
    }
}
