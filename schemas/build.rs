//! Rebuilds this crate when a migration is added or edited: `embed_migrations!` reads the
//! directory at compile time, and cargo does not know about that dependency on its own.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
