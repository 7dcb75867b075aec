//! Build script: records the commit eps is built from, for `eps_build_info{commit}` and `eps --version`
//! users who need to know what runs. Order: `EPS_BUILD_COMMIT` from the environment (a packager that
//! builds from a tarball may set it), then `git describe --always` in the source tree, then
//! "unknown" (no git, or not a checkout). Never fails the build.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=EPS_BUILD_COMMIT");
    println!("cargo:rerun-if-changed=build.rs");
    let commit = std::env::var("EPS_BUILD_COMMIT").ok().filter(|c| !c.trim().is_empty()).or_else(git_commit);
    println!("cargo:rustc-env=EPS_BUILD_COMMIT={}", commit.as_deref().map(str::trim).unwrap_or("unknown"));
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!text.is_empty()).then_some(text)
}

fn git_commit() -> Option<String> {
    // Only this crate's own checkout: a tarball unpacked inside some other repository has no
    // commit of its own.
    let top = git(&["rev-parse", "--show-toplevel"])?;
    let here = std::env::var("CARGO_MANIFEST_DIR").ok()?;
    if std::fs::canonicalize(&top).ok()? != std::fs::canonicalize(&here).ok()? {
        return None;
    }
    // Rebuild when HEAD moves (a commit, a checkout); works in linked worktrees too. Only files that
    // exist are named: a missing one would make cargo rerun this script, and rebuild eps, every time.
    let mut watched = vec!["HEAD".to_string(), "packed-refs".to_string()];
    watched.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for path in watched {
        if let Some(p) = git(&["rev-parse", "--git-path", &path]).filter(|p| std::path::Path::new(p).exists()) {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    git(&["describe", "--always", "--abbrev=12"])
}
