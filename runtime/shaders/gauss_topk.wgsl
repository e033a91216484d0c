// Gemma 3n's Gaussian top-k on the FFN gate, one workgroup per token row, in place on the first
// `width` values of gate [t, stride]: cutoff = mean + std * mult (population std, mult =
// Phi^-1(sparsity)), gate = max(gate - cutoff, 0).

const WG: u32 = 64u;

struct Params {
    width: u32,
    stride: u32,
    mult: f32,
    _pad0: u32,
}

struct Step {
    pos0: u32,
    t: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read_write> gate: array<f32>;

var<workgroup> red: array<f32, WG>;

fn reduce_sum(v: f32, lid: u32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if lid < k {
            red[lid] += red[lid + k];
        }
        workgroupBarrier();
    }
    let s = red[0];
    workgroupBarrier();
    return s;
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_id) lid3: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let lid = lid3.x;
    let b = wid.x * p.stride;
    let n = f32(p.width);
    var s = 0.0;
    for (var c = lid; c < p.width; c += WG) {
        s += gate[b + c];
    }
    let mean = reduce_sum(s, lid) / n;
    var v = 0.0;
    for (var c = lid; c < p.width; c += WG) {
        let e = gate[b + c] - mean;
        v += e * e;
    }
    let cutoff = mean + sqrt(reduce_sum(v, lid) / n) * p.mult;
    for (var c = lid; c < p.width; c += WG) {
        gate[b + c] = max(gate[b + c] - cutoff, 0.0);
    }
}
