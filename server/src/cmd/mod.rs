//! One module per subcommand.

pub mod bench;
pub mod eval;
pub mod generate;
pub mod model;
pub mod precompute;
