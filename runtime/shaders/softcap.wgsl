// Final logit soft-capping, in place on rows of logits [rows, stride]:
// x = cap * tanh(x / cap) for the first n values of each dispatched row.

struct Params {
    n: u32,
    stride: u32,
    cap: f32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> logits: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    if c >= p.n {
        return;
    }
    let o = gid.y * p.stride + c;
    // tanh is +-1 in f32 beyond |10|; the clamp avoids inf/inf in some implementations.
    logits[o] = p.cap * tanh(clamp(logits[o] / p.cap, -10.0, 10.0));
}
