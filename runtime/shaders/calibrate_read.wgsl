// Calibration: streaming read bandwidth. Each invocation sums (all four lanes, wrapping) a set
// of the n vec4<u32> units, and workgroup w writes the wrapping sum of its invocations to
// sums[w], so the compiler must keep every load. With `threads` = workgroups * WG invocations,
// invocation g reads:
// - BLOCKED = false (GPUs: neighbouring invocations read neighbouring units, coalesced):
//   units g, g + threads, g + 2 * threads, ... below n;
// - BLOCKED = true (CPU adapters such as lavapipe, which run an invocation's loop to the end
//   on one core: each invocation streams one contiguous block, as the decode GEMV streams a
//   weight row; the strided mapping touches 128 bytes per 64 KiB and defeats the prefetcher):
//   units [g * per, min((g + 1) * per, n)) with per = ceil(n / threads).
// 1-D grid.

override BLOCKED: bool = false;

const WG: u32 = 64u;

struct Params {
    // vec4<u32> units in `data`.
    n: u32,
    // Invocations in the grid (workgroups * WG).
    threads: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> data: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> sums: array<u32>;

var<workgroup> partial: array<u32, WG>;

@compute @workgroup_size(WG)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
) {
    var acc = vec4<u32>(0u);
    if BLOCKED {
        let per = p.n / p.threads + select(0u, 1u, p.n % p.threads != 0u);
        let start = gid.x * per;
        let end = min(start + per, p.n);
        for (var i = start; i < end; i++) {
            acc += data[i];
        }
    } else {
        for (var i = gid.x; i < p.n; i += p.threads) {
            acc += data[i];
        }
    }
    partial[lid.x] = acc.x + acc.y + acc.z + acc.w;
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
