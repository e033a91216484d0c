//! Helpers shared by the subcommands: opening a file, dtype names, JSON output.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Result};
use matformer::format::DType;
use matformer::ModelFile;
use serde::Serialize;

/// Parses a storage dtype flag (`f16`, `f32`).
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f16" => Ok(DType::F16),
        "f32" => Ok(DType::F32),
        other => bail!("unknown dtype `{other}` (f16 or f32)"),
    }
}

/// Opens (maps and parses the header of) a `.matf` file.
pub fn open(file: &Path) -> Result<Arc<ModelFile>> {
    Ok(Arc::new(ModelFile::open(file)?))
}

/// Prints `v` as pretty JSON on stdout.
pub fn print_json<T: Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}
