// FFN activation over the first `width` neurons of t tokens, in place on up [t, stride]:
// gated (GATED): up = up * act(gate) (SwiGLU / GeGLU, the CPU engine's order), else up = act(up).
// act = SiLU x / (1 + exp(-x)), or tanh-approximated GELU when GELU.
// `width` is a uniform, so every submodel width runs the same pipeline.

override GATED: bool = true;
override GELU: bool = false;

struct Params {
    width: u32,
    stride: u32,
    _pad0: u32,
    _pad1: u32,
}

struct Step {
    pos0: u32,
    t: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read_write> up: array<f32>;
@group(0) @binding(3) var<storage, read> gate: array<f32>;

fn act(x: f32) -> f32 {
    if GELU {
        // tanh saturates to +-1 in f32 beyond |10|; clamping avoids inf/inf in some tanh implementations.
        let a = clamp(0.7978846 * (x + 0.044715 * x * x * x), -10.0, 10.0);
        return 0.5 * x * (1.0 + tanh(a));
    }
    return x / (1.0 + exp(-x));
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let i = gid.y;
    if c >= p.width || i >= step.t {
        return;
    }
    let o = i * p.stride + c;
    if GATED {
        up[o] = up[o] * act(gate[o]);
    } else {
        up[o] = act(up[o]);
    }
}
