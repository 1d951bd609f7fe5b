//! One module per subcommand (`serve` has its own module, [`crate::serve`]).

pub mod generate;
pub mod model;
pub mod precompute;
