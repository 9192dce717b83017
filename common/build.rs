//! Rebuild when a migration file is added or changed: `sqlx::migrate!` and `include_str!`
//! embed the migrations, but cargo does not watch a folder for new files on its own.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
