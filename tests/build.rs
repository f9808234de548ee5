//! Compiles the portable guest-side C (the code the Linux driver and the
//! test guests share) so the tests can drive it against the Rust readers.

use std::path::Path;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root");
    let include = root.join("guest-driver/include");
    let lib = root.join("guest-driver/lib/backdoor_guest.c");
    cc::Build::new()
        .file(&lib)
        .file("c/bump_shim.c")
        .file(root.join("guest-driver/lib/backdoor_pool.c"))
        .file("c/app_shim.c")
        .include(&include)
        .flag("-Wall")
        .flag("-Wextra")
        .warnings_into_errors(true)
        .compile("backdoor_guest");
    println!("cargo:rerun-if-changed={}", lib.display());
    println!("cargo:rerun-if-changed={}", include.display());
    println!("cargo:rerun-if-changed=c/bump_shim.c");
    println!("cargo:rerun-if-changed=c/app_shim.c");
    println!("cargo:rerun-if-changed=../guest-driver/lib/backdoor_pool.c");
}
