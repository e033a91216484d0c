//! Helpers shared by the subcommands: opening a file, JSON output.

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use matformer::ModelFile;
use serde::Serialize;

/// Opens (maps and parses the header of) a `.matf` file.
pub fn open(file: &Path) -> Result<Arc<ModelFile>> {
    Ok(Arc::new(ModelFile::open(file)?))
}

/// Prints `v` as pretty JSON on stdout.
pub fn print_json<T: Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}
