// Sampling candidates of logits row 0 (n values): the penalties of the observed tokens are
// applied in place, then the k largest values (ties to the lowest index) are written as
// (index, value bits) pairs in index order, followed by the log-sum-exp of value * inv_temp over
// all n. NaN counts as -inf and -0.0 as +0.0 (the sampler's candidate order). One workgroup; a
// decode step reads back 2k + 1 words instead of n.
//
// The k-th largest value is found by a radix select on an order-preserving u32 key of the f32
// bits (4 passes of 8 bits, a 256-bin histogram each); a final pass over contiguous index ranges
// (one per invocation) writes the values above it and, in index order, as many equal to it as k
// still needs, so the output set is deterministic.

const WG: u32 = 256u;
const NEG_INF: u32 = 0xff800000u;

struct Params {
    // Logits (vocabulary size).
    n: u32,
    // Candidates, 1 <= k <= n.
    k: u32,
    // Entries of `pen`.
    n_pen: u32,
    _pad0: u32,
    // 1 / temperature of the log-sum-exp.
    inv_temp: f32,
    // Repetition penalty: positive logits divided by it, others multiplied.
    rep: f32,
    // Subtracted once per occurrence.
    freq: f32,
    // Subtracted once.
    presence: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
// (token, count) of each distinct observed token, count >= 1.
@group(0) @binding(1) var<storage, read> pen: array<vec2<u32>>;
@group(0) @binding(2) var<storage, read_write> logits: array<f32>;
// k (index, value bits) pairs, then the log-sum-exp's bits.
@group(0) @binding(3) var<storage, read_write> cand: array<u32>;

var<workgroup> hist: array<atomic<u32>, 256>;
var<workgroup> red: array<f32, WG>;
var<workgroup> cnt_gt: array<u32, WG>;
var<workgroup> cnt_eq: array<u32, WG>;
// The select's state: key prefix found so far, its mask, rank still wanted within the prefix.
var<workgroup> sel: vec3<u32>;

// Bits of the canonical value: NaN as -inf, -0.0 as +0.0.
fn canon_bits(v: f32) -> u32 {
    var b = bitcast<u32>(v);
    if (b & 0x7fffffffu) > 0x7f800000u {
        b = NEG_INF;
    }
    if b == 0x80000000u {
        b = 0u;
    }
    return b;
}

// Unsigned key with the order of the float values.
fn key_of(b: u32) -> u32 {
    return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_id) lid: vec3<u32>) {
    let t = lid.x;
    // 1. Penalties, in place (each token listed once).
    for (var j = t; j < p.n_pen; j += WG) {
        let e = pen[j];
        if e.x < p.n && e.y > 0u {
            let v = logits[e.x];
            let r = select(v * p.rep, v / p.rep, v > 0.0);
            logits[e.x] = r - f32(e.y) * p.freq - p.presence;
        }
    }
    if t == 0u {
        sel = vec3<u32>(0u, 0u, p.k);
    }
    storageBarrier();
    workgroupBarrier();

    // 2. Radix select of the k-th largest key, 8 bits per pass from the top; the largest
    // canonical value on the way (for the log-sum-exp).
    var mx = bitcast<f32>(NEG_INF);
    for (var digit = 0u; digit < 4u; digit++) {
        let shift = 24u - 8u * digit;
        atomicStore(&hist[t], 0u);
        workgroupBarrier();
        let pre = sel.x;
        let msk = sel.y;
        for (var i = t; i < p.n; i += WG) {
            let b = canon_bits(logits[i]);
            let kk = key_of(b);
            if (kk & msk) == pre {
                atomicAdd(&hist[(kk >> shift) & 255u], 1u);
            }
            if digit == 0u {
                mx = max(mx, bitcast<f32>(b));
            }
        }
        workgroupBarrier();
        if t == 0u {
            var rem = sel.z;
            var bin = 255u;
            loop {
                let h = atomicLoad(&hist[bin]);
                if h >= rem || bin == 0u {
                    break;
                }
                rem -= h;
                bin -= 1u;
            }
            sel = vec3<u32>(pre | (bin << shift), msk | (255u << shift), rem);
        }
        workgroupBarrier();
    }
    let thr = sel.x;
    let need_eq = sel.z;

    red[t] = mx;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if t < s {
            red[t] = max(red[t], red[t + s]);
        }
        workgroupBarrier();
    }
    let top = red[0];
    let top_finite = canon_bits(top) != NEG_INF;
    workgroupBarrier();

    // 3. Counts above and at the threshold over this invocation's index range, and its part of
    // the sum of exp((v - top) * inv_temp) (-inf terms are 0).
    let chunk = (p.n + WG - 1u) / WG;
    let lo = min(t * chunk, p.n);
    let hi = min(lo + chunk, p.n);
    var g = 0u;
    var e = 0u;
    var sum = 0.0;
    for (var i = lo; i < hi; i++) {
        let b = canon_bits(logits[i]);
        let kk = key_of(b);
        if kk > thr {
            g += 1u;
        } else if kk == thr {
            e += 1u;
        }
        if b != NEG_INF && top_finite {
            sum += exp((bitcast<f32>(b) - top) * p.inv_temp);
        }
    }
    cnt_gt[t] = g;
    cnt_eq[t] = e;
    red[t] = sum;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if t < s {
            red[t] += red[t + s];
        }
        workgroupBarrier();
    }
    if t == 0u {
        // Exclusive prefix sums: where each range writes.
        var ag = 0u;
        var ae = 0u;
        for (var r = 0u; r < WG; r++) {
            let x = cnt_gt[r];
            cnt_gt[r] = ag;
            ag += x;
            let y = cnt_eq[r];
            cnt_eq[r] = ae;
            ae += y;
        }
        var lse = bitcast<f32>(NEG_INF);
        if top_finite {
            lse = top * p.inv_temp + log(red[0]);
        }
        cand[2u * p.k] = bitcast<u32>(lse);
    }
    workgroupBarrier();

    // 4. Write the candidates: every value above the threshold, then the first `need_eq`
    // (lowest indices) equal to it.
    var og = cnt_gt[t];
    var oe = cnt_eq[t];
    let base_eq = p.k - need_eq;
    for (var i = lo; i < hi; i++) {
        let b = canon_bits(logits[i]);
        let kk = key_of(b);
        if kk > thr {
            cand[2u * og] = i;
            cand[2u * og + 1u] = b;
            og += 1u;
        } else if kk == thr {
            if oe < need_eq {
                cand[2u * (base_eq + oe)] = i;
                cand[2u * (base_eq + oe) + 1u] = b;
            }
            oe += 1u;
        }
    }
}
