//! Speed of the CPU engine on a ~1.2B-parameter synthetic model shaped like Llama-3.2-1B
//! (d_model 2048, 16 layers, 32 heads, 8 KV heads, head_dim 64, FFN 8192 nested as
//! 1024/2048/4096/8192, vocab 128256, tied embeddings, f16). Ignored by default: it writes a
//! 2.5 GB file (once; reused from `MATF_BENCH_FILE` or the temp dir) and takes a minute.
//!
//! ```text
//! cargo test -p matformer --no-default-features --release --test cpu_speed -- --ignored --nocapture
//! ```
//! Prints prefill and decode tokens/s per submodel and the weight bytes each decoded token
//! reads, against the machine's measured read bandwidth. Environment: `MATF_THREADS` (default:
//! all cores), `MATF_SUBMODELS` (space-separated specs), `MATF_DECODE` (tokens, default 16),
//! `MATF_LOAD=heap` (read the file into memory instead of mapping it), `MATF_BENCH_FILE`.
//! The kernels run about twice as fast when the build enables F16C/AVX2
//! (`RUSTFLAGS="-C target-feature=+avx2,+fma,+f16c"`), see `cpu/kernels/`.

use std::io::BufWriter;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use matformer::cpu::{argmax, CpuEngine};
use matformer::format::testing::{synthetic_metadata, write_synthetic};
use matformer::format::{DType, Metadata};
use matformer::{ModelFile, Submodel};

fn llama_1b_like() -> Metadata {
    let mut m = synthetic_metadata(2048, 16, 32, 8, 64, 128_256, vec![vec![1024, 2048, 4096, 8192]], true, true);
    m.architecture.max_context = 4096;
    m.architecture.rope_theta = 500_000.0;
    m
}

fn bench_file() -> PathBuf {
    let path = std::env::var_os("MATF_BENCH_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("matformer-bench-llama-1b-f16.matf"));
    let meta = llama_1b_like();
    let fresh = ModelFile::open(&path).map(|m| m.metadata() == &meta).unwrap_or(false);
    if !fresh {
        eprintln!("writing {} ...", path.display());
        let t = Instant::now();
        let tmp = path.with_extension("partial");
        let f = std::fs::File::create(&tmp).expect("create bench file");
        write_synthetic(BufWriter::with_capacity(1 << 22, f), &meta, DType::F16, 7).expect("write bench file");
        std::fs::rename(&tmp, &path).expect("rename bench file");
        eprintln!("written in {:.1} s", t.elapsed().as_secs_f64());
    }
    path
}

/// Read bandwidth of this machine (GB/s) summing a 1 GiB buffer with `threads` threads.
fn read_bandwidth(threads: usize) -> f64 {
    let buf = vec![1u64; 1 << 27];
    let mut best = 0.0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let chunk = buf.len().div_ceil(threads);
        let total: u64 = std::thread::scope(|s| {
            let hs: Vec<_> = buf.chunks(chunk).map(|c| s.spawn(move || c.iter().fold(0u64, |a, &b| a ^ b))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).fold(0, |a, b| a ^ b)
        });
        std::hint::black_box(total);
        best = best.max((buf.len() * 8) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

#[test]
#[ignore = "benchmark: writes a 2.5 GB model file; run with --ignored --nocapture"]
fn decode_speed_llama_1b_like() {
    let path = bench_file();
    // MATF_LOAD=heap reads the file into memory instead of mapping it.
    let model = if std::env::var("MATF_LOAD").as_deref() == Ok("heap") {
        Arc::new(ModelFile::from_bytes(std::fs::read(&path).unwrap()).unwrap())
    } else {
        Arc::new(ModelFile::open(&path).unwrap())
    };
    let meta = model.metadata().clone();
    let threads = std::env::var("MATF_THREADS").ok().and_then(|v| v.parse().ok());
    let mut engine = CpuEngine::new(model.clone()).unwrap();
    if let Some(n) = threads {
        engine = engine.with_threads(n);
    }
    let n_threads = engine.threads();
    eprintln!(
        "threads {n_threads}; read bandwidth: 1 thread {:.1} GB/s, {n_threads} threads {:.1} GB/s",
        read_bandwidth(1),
        read_bandwidth(n_threads)
    );
    let a = &meta.architecture;
    let d = u64::from(a.d_model);
    let attn = d * u64::from(a.n_heads * a.head_dim) * 2 + d * u64::from(a.n_kv_heads * a.head_dim) * 2;
    let head = u64::from(a.vocab_size) * d;
    let prompt: Vec<u32> = b"The quick brown fox jumps over the lazy dog. ".iter().map(|&b| u32::from(b)).collect();
    let n_decode = std::env::var("MATF_DECODE").ok().and_then(|v| v.parse().ok()).unwrap_or(16usize);
    let specs = std::env::var("MATF_SUBMODELS").unwrap_or_else(|_| "s m xl 0,0,0,0,1,1,1,1,2,2,2,2,3,3,3,3".into());
    for spec in specs.split_whitespace() {
        let sub = Submodel::parse(spec, &meta, model.view().available_levels).unwrap();
        let ffn: u64 = sub.widths(&meta).iter().map(|&w| u64::from(w) * d * 3).sum();
        let bytes_per_token = (attn * u64::from(a.n_layers) + ffn + head) * 2;
        let mut s = engine.session(&sub).unwrap();
        // Warm the page cache for this submodel's weights.
        s.decode(1).unwrap();
        s.reset();
        let t = Instant::now();
        let mut logits = s.prefill(&prompt).unwrap();
        let prefill_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for _ in 0..n_decode {
            logits = s.decode(argmax(&logits)).unwrap();
        }
        let decode_s = t.elapsed().as_secs_f64() / n_decode as f64;
        eprintln!(
            "{:>8}: prefill {} tokens {:.2} s ({:.1} tok/s) | decode {:.1} ms/token = {:.2} tok/s, {:.2} GB/token, {:.1} GB/s",
            sub.name(&meta),
            prompt.len(),
            prefill_s,
            prompt.len() as f64 / prefill_s,
            decode_s * 1e3,
            1.0 / decode_s,
            bytes_per_token as f64 / 1e9,
            bytes_per_token as f64 / decode_s / 1e9
        );
    }
}
