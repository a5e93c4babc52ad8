//! Writes the man page and the shell completions, made from the command line's own
//! definition (src/args.rs), into `target/<profile>/assets/` for the Debian package
//! (`cargo deb` builds, then packages them; see `[package.metadata.deb]`).

use std::path::PathBuf;

#[allow(dead_code)]
#[path = "src/args.rs"]
mod args;

fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=src/args.rs");
    println!("cargo:rerun-if-changed=build.rs");
    // OUT_DIR is target/<profile>/build/apikeyd-<hash>/out.
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let assets = out
        .ancestors()
        .nth(3)
        .expect("OUT_DIR is target/<profile>/build/<pkg>/out")
        .join("assets");
    std::fs::create_dir_all(&assets)?;
    args::man_page(&mut std::fs::File::create(assets.join("apikeyd.1"))?)?;
    for (shell, file) in [
        (clap_complete::Shell::Bash, "apikeyd.bash"),
        (clap_complete::Shell::Zsh, "_apikeyd"),
        (clap_complete::Shell::Fish, "apikeyd.fish"),
    ] {
        args::completions(shell, &mut std::fs::File::create(assets.join(file))?);
    }
    Ok(())
}
