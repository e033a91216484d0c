// Index of the largest of n logits of a row: the first one on ties, NaNs ignored, 0 when no
// value is larger than -inf (the CPU engine's `argmax`). Workgroup r takes row r (rows `stride`
// floats apart) and writes result[r]: one workgroup for a decode step, which reads back only
// this u32; one per token for the speculative verify pass.

const WG: u32 = 256u;
const NONE: u32 = 0xffffffffu;

struct Params {
    n: u32,
    stride: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> result: array<u32>;

var<workgroup> best_v: array<f32, WG>;
var<workgroup> best_i: array<u32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_id) lid: vec3<u32>, @builtin(workgroup_id) wid: vec3<u32>) {
    let base = wid.x * p.stride;
    var bv = bitcast<f32>(0xff800000u);
    var bi = NONE;
    for (var i = lid.x; i < p.n; i += WG) {
        let v = logits[base + i];
        if v > bv {
            bv = v;
            bi = i;
        }
    }
    best_v[lid.x] = bv;
    best_i[lid.x] = bi;
    workgroupBarrier();
    for (var k = WG / 2u; k > 0u; k >>= 1u) {
        if lid.x < k {
            let ov = best_v[lid.x + k];
            let oi = best_i[lid.x + k];
            let cv = best_v[lid.x];
            let ci = best_i[lid.x];
            if oi != NONE && (ci == NONE || ov > cv || (ov == cv && oi < ci)) {
                best_v[lid.x] = ov;
                best_i[lid.x] = oi;
            }
        }
        workgroupBarrier();
    }
    if lid.x == 0u {
        result[wid.x] = select(best_i[0], 0u, best_i[0] == NONE);
    }
}
