//! Writes the seed corpora: `cargo run --example seeds -- DIR` makes
//! DIR/TARGET/seed-N for every fuzz target (what `./dev fuzz` runs first).

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "seeds".into()));
    for (target, seeds) in hull_fuzz::seeds::all() {
        let d = dir.join(target);
        std::fs::create_dir_all(&d)?;
        for (i, seed) in seeds.iter().enumerate() {
            std::fs::write(d.join(format!("seed-{i}")), seed)?;
        }
    }
    Ok(())
}
