//! `matformer`: the desktop harness of the MatFormer runtime.
//!
//! Human-readable output by default, JSON with `--json`; progress and statistics on stderr;
//! every error is one line on stderr and a non-zero exit.

mod backend;
mod bench;
mod chat;
mod common;
mod devices;
mod eval;
mod export;
mod generate;
mod import;
mod inspect;
mod latency;
mod select;
mod spec_bench;
mod switch_bench;
mod synth;
mod verify;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The MatFormer runtime's desktop harness: export, inspect, verify and run universal weight files.
#[derive(Debug, Parser)]
#[command(name = "matformer", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Storage dtypes accepted by `--dtype` (and, with the same names, by `--dtype-override`).
pub(crate) const DTYPES: [&str; 7] = ["f16", "f32", "q8", "q8_0", "q4", "q4_0", "q4_1"];
/// `import`'s dtypes: [`DTYPES`] and `keep` (the source's own, per tensor).
pub(crate) const IMPORT_DTYPES: [&str; 8] = ["f16", "f32", "q8", "q8_0", "q4", "q4_0", "q4_1", "keep"];

#[derive(Debug, Subcommand)]
enum Command {
    /// Export a trained MatFormer from ONNX to a universal .matf file, and prove it right.
    Export {
        /// Source ONNX model (external .onnx.data next to it is read too).
        input: PathBuf,
        /// Output .matf file.
        #[arg(short, long)]
        output: PathBuf,
        /// Storage dtype: f16, f32, q8 (= q8_0), q4 (= q4_0), q4_1. Norms stay f16 when it is
        /// quantised.
        #[arg(long, default_value = "f16", value_parser = DTYPES)]
        dtype: String,
        /// Per-tensor dtype, KEY=DTYPE (repeatable or comma-separated): KEY is embed, lm_head,
        /// attn, ffn, wq, wk, wv, wo, ffn_gate, ffn_up, ffn_down_t or a tensor name, e.g.
        /// `--dtype q4 --dtype-override embed=q8,lm_head=q8`.
        #[arg(long = "dtype-override", value_delimiter = ',')]
        dtype_override: Vec<String>,
        /// Nested FFN widths for every layer, smallest first (overrides the model's metadata).
        #[arg(long, value_delimiter = ',')]
        widths: Option<Vec<u32>>,
        /// Config JSON: a Hugging Face config.json or our own keys (docs/format.md). Default:
        /// the ONNX's `matformer_config` metadata, else a config.json next to the ONNX.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Mapping file from canonical to initializer names (docs/exporter.md).
        #[arg(long, conflicts_with = "by_structure")]
        mapping: Option<PathBuf>,
        /// Find the weights by graph structure only, ignoring names.
        #[arg(long)]
        by_structure: bool,
        /// Skip the verification against tract-onnx (not recommended).
        #[arg(long, conflicts_with = "verify_goldens")]
        no_verify: bool,
        /// Verify against PyTorch goldens (JSON: probes of token ids and float32 logits, see
        /// docs/exporter.md) instead of running the ONNX graph in tract, for graphs with ops
        /// tract lacks.
        #[arg(long)]
        verify_goldens: Option<PathBuf>,
        /// Calibration text: estimate every Mix'n'Match catalog entry's loss on it and store
        /// the catalog (with its Pareto frontier) in the file.
        #[arg(long)]
        calibration: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Import a pretrained model: a GGUF file or a Hugging Face directory (Llama family or
    /// Gemma 3n).
    Import(import::ImportArgs),
    /// Write a file with random weights at real model shapes (benchmarks).
    Synth {
        /// Shape preset: llama-3.2-1b, gemma-3n-e4b (the real Gemma 3n tensor set), gemma-3n-tiny,
        /// gemma-3n-e4b-narrow (E4B's depth and FFN widths at d_model 8: Google's slices apply),
        /// gemma-3n-e2b (Llama block at E2B-like shapes), small; --list describes them.
        #[arg(long, default_value = "llama-3.2-1b")]
        preset: String,
        /// Output .matf file.
        #[arg(short, long)]
        output: PathBuf,
        /// Override the number of layers.
        #[arg(long)]
        layers: Option<u32>,
        /// Storage dtype: f16, f32, q8 (= q8_0), q4 (= q4_0), q4_1. Norms stay f16 when it is
        /// quantised.
        #[arg(long, default_value = "f16", value_parser = DTYPES)]
        dtype: String,
        /// Per-tensor dtype, KEY=DTYPE (repeatable or comma-separated), as for `export`.
        #[arg(long = "dtype-override", value_delimiter = ',')]
        dtype_override: Vec<String>,
        /// Random seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// List the presets and exit.
        #[arg(long)]
        list: bool,
    },
    /// Show a file's architecture, nested widths, level boundaries and tensors.
    Inspect {
        /// The .matf file.
        file: PathBuf,
        /// List every tensor and segment.
        #[arg(long)]
        tensors: bool,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check every checksum; with --against, compare with the source ONNX at every width.
    Verify {
        /// The .matf file.
        file: PathBuf,
        /// Source ONNX to compare logits against (tract-onnx).
        #[arg(long)]
        against: Option<PathBuf>,
        /// Mapping file for the source's weight names.
        #[arg(long)]
        mapping: Option<PathBuf>,
        /// Submodels to compare (default: every width and a Mix'n'Match).
        #[arg(long)]
        submodel: Vec<String>,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Generate text from a prompt (greedy by default; sampling and stop flags).
    Generate(generate::GenerateArgs),
    /// Chat with a model: an interactive session (or one `--prompt`), streamed.
    Chat(chat::ChatArgs),
    /// The submodel the runtime would run under a device budget, and which constraint decided.
    Select {
        /// The .matf file.
        file: PathBuf,
        #[command(flatten)]
        budget: select::BudgetArgs,
        /// With --latency-ms: the latency cost model (cached per device and model shape).
        #[command(flatten)]
        cost: latency::CostArgs,
        /// Also list every catalog entry with its footprint and the constraints it violates.
        #[arg(long)]
        all: bool,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The per-device latency cost model of a file (cached, else calibrated) and, with
    /// --check, its prediction error against real decodes of catalog entries.
    Latency {
        /// The .matf file.
        file: PathBuf,
        #[command(flatten)]
        cost: latency::CostArgs,
        /// Decode catalog entries and compare with the predictions (every entry up to
        /// --check-max, else the Pareto frontier or an even sample; the report says which).
        #[arg(long)]
        check: bool,
        /// Most entries --check decodes.
        #[arg(long, default_value_t = 40)]
        check_max: usize,
        /// Prompt tokens before each checked decode.
        #[arg(long, default_value_t = 4)]
        prompt_len: usize,
        /// Timed decode steps per checked entry and pass (default: as many as a fit decode).
        #[arg(long, default_value_t = 4)]
        gen_len: usize,
        /// Passes over the checked entries (each entry's figure is its fastest step over all
        /// passes; default: as many as the fit decodes).
        #[arg(long, default_value_t = 2)]
        repeats: usize,
        /// Context for the printed predictions (default: the check's).
        #[arg(long)]
        context: Option<u32>,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List GPU adapters, their limits and the paths the runtime would choose.
    Devices {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Benchmark prefill and decode per submodel and backend, with efficiency against the
    /// machine's measured bandwidth and arithmetic throughput (in the manner of llama-bench).
    Bench {
        /// The .matf file.
        file: PathBuf,
        /// Backends to measure (repeatable).
        #[arg(long, value_enum, default_values = ["cpu"])]
        backend: Vec<chat::BackendArg>,
        /// Submodels to measure (repeatable; default: smallest and largest; `auto`: the entry
        /// `select` picks for the budget flags).
        #[arg(long)]
        submodel: Vec<String>,
        #[command(flatten)]
        budget: select::BudgetArgs,
        /// Prompt tokens for the prefill measurement.
        #[arg(long, default_value_t = 64)]
        prompt_len: usize,
        /// Tokens to decode.
        #[arg(long, default_value_t = 32)]
        gen_len: usize,
        /// Timed prefill + decode runs per row; speeds are their mean and standard deviation
        /// (llama-bench's `-r`).
        #[arg(long, short = 'r', default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
        repetitions: u32,
        /// CPU threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Measure switching instead: downshift, upshift (mid-generation and between requests)
        /// and memory-pressure handling, with the mapping's resident memory before and after.
        #[arg(long)]
        switch: bool,
        /// Measure nested speculative decoding instead: each draft (--draft, default every
        /// level below the verifier, the first --submodel or the largest) with a shared and an
        /// own KV cache against the verifier alone (greedy, --gen-len tokens per prompt).
        #[arg(long)]
        speculative: bool,
        /// Drafts for --speculative (repeatable).
        #[arg(long)]
        draft: Vec<String>,
        /// Prompts for --speculative (repeatable; default: four English sentence openings).
        #[arg(long)]
        prompt: Vec<String>,
        /// Tokens drafted in the first round (--speculative).
        #[arg(long, default_value_t = 4)]
        draft_k: usize,
        /// Most tokens drafted in a round (--speculative).
        #[arg(long, default_value_t = 8)]
        draft_max_k: usize,
        /// Keep k fixed (--speculative).
        #[arg(long)]
        fixed_k: bool,
        /// The drafts propose only among the first N token ids, or `all` (repeatable: every
        /// draft is measured with each; --speculative; default: all).
        #[arg(long, value_name = "N|all", value_parser = parse_draft_vocab)]
        draft_vocab: Vec<DraftVocab>,
        /// Project the measured costs at this acceptance rate, in [0, 1] (repeatable;
        /// --speculative).
        #[arg(long)]
        project_acceptance: Vec<f64>,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Mean loss and perplexity on a text file, with the model's own tokenizer (per byte for
    /// the byte tokenizer, per token for an imported model's).
    Eval {
        /// The .matf file.
        file: PathBuf,
        /// Text file to score.
        #[arg(long)]
        text: PathBuf,
        /// Submodel(s) to evaluate (repeatable; default: largest).
        #[arg(long)]
        submodel: Vec<String>,
        /// Tokens per chunk including BOS (default: the model's context, at most 1024).
        #[arg(long)]
        chunk: Option<usize>,
        /// CPU threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Mesa's Vulkan drivers print "error: XDG_RUNTIME_DIR is invalid or not set" on stderr for
/// every instance when the variable is missing (headless machines, CI), which would break the
/// one-line-error contract of this tool. Point it at a private directory when it is unset.
#[cfg(unix)]
fn ensure_xdg_runtime_dir() {
    use std::os::unix::fs::PermissionsExt;
    let valid = std::env::var_os("XDG_RUNTIME_DIR").is_some_and(|d| std::path::Path::new(&d).is_dir());
    if valid {
        return;
    }
    let dir = std::env::temp_dir().join("matformer-xdg-runtime");
    if std::fs::create_dir_all(&dir).is_ok()
        && std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).is_ok()
    {
        // Single-threaded here: nothing else reads the environment concurrently.
        std::env::set_var("XDG_RUNTIME_DIR", &dir);
    }
}

#[cfg(not(unix))]
fn ensure_xdg_runtime_dir() {}

fn main() -> ExitCode {
    ensure_xdg_runtime_dir();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).format_timestamp(None).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Export {
            input,
            output,
            dtype,
            dtype_override,
            widths,
            config,
            mapping,
            by_structure,
            no_verify,
            verify_goldens,
            calibration,
            json,
        } => export::run(
            input,
            output,
            &dtype,
            &dtype_override,
            widths,
            config,
            mapping,
            by_structure,
            no_verify,
            verify_goldens,
            calibration,
            json,
        ),
        Command::Import(args) => import::run(args),
        Command::Synth { preset, output, layers, dtype, dtype_override, seed, list } => {
            synth::run(&preset, output, layers, &dtype, &dtype_override, seed, list)
        }
        Command::Inspect { file, tensors, json } => inspect::run(&file, tensors, json),
        Command::Verify { file, against, mapping, submodel, json } => {
            verify::run(&file, against, mapping, submodel, json)
        }
        Command::Generate(args) => generate::run(&args),
        Command::Chat(args) => chat::run(&args),
        Command::Devices { json } => devices::run(json),
        Command::Select { file, budget, cost, all, json } => select::run(&file, &budget, &cost, all, json),
        Command::Latency { file, cost, check, check_max, prompt_len, gen_len, repeats, context, json } => {
            latency::run(&file, &cost, check, check_max, prompt_len, gen_len, repeats, context, json)
        }
        Command::Bench {
            file,
            backend,
            submodel,
            budget,
            prompt_len,
            gen_len,
            repetitions,
            threads,
            switch,
            speculative,
            draft,
            prompt,
            draft_k,
            draft_max_k,
            fixed_k,
            draft_vocab,
            project_acceptance,
            json,
        } => {
            let backend: Vec<matformer::BackendChoice> = backend.into_iter().map(Into::into).collect();
            if speculative {
                let a = spec_bench::SpecBenchArgs {
                    verifier: submodel.first().cloned(),
                    drafts: draft,
                    prompts: prompt,
                    gen_len,
                    repetitions: repetitions as usize,
                    k: draft_k.max(1),
                    max_k: draft_max_k,
                    fixed_k,
                    draft_vocabs: if draft_vocab.is_empty() {
                        vec![None]
                    } else {
                        draft_vocab.into_iter().map(|v| v.0).collect()
                    },
                    project: project_acceptance,
                };
                spec_bench::run(&file, &backend, threads, &a, json)
            } else if switch {
                switch_bench::run(&file, &backend, prompt_len, gen_len, threads, json)
            } else {
                let run = bench::RunShape { prompt_len, gen_len, repetitions: repetitions as usize };
                bench::bench(&file, &backend, submodel, &budget, run, threads, json)
            }
        }
        Command::Eval { file, text, submodel, chunk, threads, json } => {
            eval::run(&file, &text, submodel, chunk, threads, json)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A `bench --draft-vocab` value: the first N token ids, or `None` (`all`) for the whole
/// vocabulary.
#[derive(Clone, Copy, Debug)]
struct DraftVocab(Option<usize>);

fn parse_draft_vocab(s: &str) -> Result<DraftVocab, String> {
    if s == "all" {
        return Ok(DraftVocab(None));
    }
    match s.parse::<usize>() {
        Ok(0) => Err("a draft vocabulary needs at least 1 token id".into()),
        Ok(n) => Ok(DraftVocab(Some(n))),
        Err(_) => Err(format!("`{s}` is neither a token count nor `all`")),
    }
}
