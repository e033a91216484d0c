// Calibration: streaming read bandwidth. Invocation g of `threads` (= workgroups * WG) sums
// the vec4<u32> units g, g + threads, g + 2 * threads, ... below n (all four lanes, wrapping),
// and workgroup w writes the wrapping sum of its invocations to sums[w], so the compiler must
// keep every load. 1-D grid.

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
    for (var i = gid.x; i < p.n; i += p.threads) {
        acc += data[i];
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
