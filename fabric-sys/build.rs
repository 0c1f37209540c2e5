//! Generates bindings to the installed libfabric (found by pkg-config).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rerun-if-changed=src/escape.c");
    // The way out of a call that never returns (see src/escape.c): C, so
    // that the jump out of a signal handler skips no Rust destructor.
    cc::Build::new()
        .file("src/escape.c")
        .warnings(true)
        .compile("m2n_fi_escape");
    // Headers only: the library is loaded at run time (see src/lib.rs).
    let lib = pkg_config::Config::new()
        .atleast_version("1.14")
        .cargo_metadata(false)
        .probe("libfabric")
        .unwrap_or_else(|e| {
            panic!(
                "libfabric's headers were not found by pkg-config ({e}); install Debian's \
                 libfabric-dev (scripts/setup does), or build m2n without the `fabric` feature"
            )
        });
    let bindings = bindgen::Builder::default()
        .header("wrapper.h")
        .clang_args(
            lib.include_paths
                .iter()
                .map(|p| format!("-I{}", p.display())),
        )
        .allowlist_type("fi_.*|fid.*")
        .allowlist_var("FI_.*")
        // The library's exported functions m2n calls, as a struct loaded
        // with dlopen. The header's `static inline` calls are not symbols
        // of the library: m2n makes them through the ops tables.
        .allowlist_function("fi_(getinfo|freeinfo|dupinfo|fabric|strerror|version)")
        .dynamic_library_name("LibFabric")
        .dynamic_link_require_all(true)
        .generate_inline_functions(false)
        .derive_default(true)
        .derive_debug(true)
        .prepend_enum_name(false)
        .blocklist_type("iovec")
        .raw_line("use libc::iovec;")
        .generate()
        .expect("bindgen could not generate the libfabric bindings");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("writing bindings.rs");
}
