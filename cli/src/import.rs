//! `matformer import`: a GGUF file or a Hugging Face model directory -> `.matf`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use matformer_export::nest::NestOptions;
use matformer_export::{import, DTypePlan, ImportOptions};

/// Arguments of `matformer import`.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// A `.gguf` file, or a Hugging Face model directory (config.json, *.safetensors,
    /// tokenizer.json, ...). Llama architecture, or Gemma 3n (text model; written with its
    /// trained levels half and full).
    pub input: PathBuf,
    /// Output .matf file.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Storage dtype: f16, f32, q8 (= q8_0), q4 (= q4_0), q4_1, or keep (each tensor in its
    /// source's dtype: a GGUF's Q8_0/Q4_0/Q4_1 blocks byte for byte, Q6_K as q8_0, Q4_K as
    /// q4_1, BF16 as f16). Norms stay f16 when it is quantised.
    #[arg(long, default_value = "f16", value_parser = crate::IMPORT_DTYPES)]
    pub dtype: String,
    /// Per-tensor dtype, KEY=DTYPE (repeatable or comma-separated), as for `export`.
    #[arg(long = "dtype-override", value_delimiter = ',')]
    pub dtype_override: Vec<String>,
    /// Order every FFN's neurons by importance on --calibration text and declare nested levels
    /// (widths h/8, h/4, h/2, h with the default 4 levels). Each level's loss is measured and
    /// stored in the catalog; a dense model was not trained for this, so small levels lose.
    #[arg(long, requires = "calibration")]
    pub nest: bool,
    /// Number of nested levels with --nest.
    #[arg(long, default_value_t = 4, requires = "nest")]
    pub levels: usize,
    /// Calibration text (UTF-8) for --nest.
    #[arg(long, requires = "nest")]
    pub calibration: Option<PathBuf>,
    /// Most calibration tokens used with --nest.
    #[arg(long, default_value_t = 1024, requires = "nest")]
    pub calibration_tokens: usize,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `matformer import`.
pub fn run(args: ImportArgs) -> Result<()> {
    let dtype = DTypePlan::parse(&args.dtype, &args.dtype_override)?;
    let nest = match (args.nest, args.calibration) {
        (true, Some(cal)) => {
            if args.calibration_tokens < 2 {
                bail!("--calibration-tokens must be at least 2");
            }
            let mut n = NestOptions::new(cal);
            n.levels = args.levels;
            n.max_tokens = args.calibration_tokens;
            Some(n)
        }
        (true, None) => bail!("--nest needs --calibration FILE"),
        (false, _) => None,
    };
    let opts = ImportOptions { input: args.input, output: args.output, dtype, nest };
    let (report, _tokenizer) = import(&opts)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let types: Vec<String> = report.source_types.iter().map(|(t, n)| format!("{n} {t}")).collect();
    println!("imported {} ({}: {})", report.output, report.source_format, types.join(", "));
    println!(
        "  {} layers, d_model {}, vocab {}, {} storage, {} bytes, {:.1} s",
        report.n_layers, report.d_model, report.vocab_size, report.dtype, report.bytes, report.seconds
    );
    println!("  levels {} (FFN widths {:?})", report.level_names.join(","), report.ffn_widths_layer0);
    println!(
        "  tokenizer {}: bos {:?}, eos {:?}, chat template {}",
        report.tokenizer,
        report.bos_id,
        report.eos_id,
        if report.has_chat_template { "yes" } else { "no" }
    );
    if let Some(n) = &report.nest {
        println!("  nested on {} calibration tokens; measured loss per level (nats/token):", n.calibration_tokens);
        for l in &n.levels {
            println!(
                "    {:<4} width {:>6}: {:.4} (perplexity {:.2})",
                l.name, l.width, l.loss_nats_per_token, l.perplexity
            );
        }
    }
    Ok(())
}
