//! One module per subcommand.

pub mod audit;
pub mod claim;
pub mod dead_letters;
pub mod jobs;
pub mod migrate;
pub mod notifications;
pub mod org;
pub mod pause;
pub mod prebuilds;
pub mod preset;
pub mod status;
pub mod template;
pub mod token;
pub mod user;
