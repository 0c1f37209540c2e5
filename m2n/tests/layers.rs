//! m2n's layers only point down (see "Architecture" in the README): the
//! protocol, codecs and helpers at the bottom, the rendezvous beside the
//! protocol, transports (owning their settings) above, then configuration
//! and streams, and the communicator on top.

#[path = "../../tests/support/layers.rs"]
mod scan;

#[test]
fn lower_layers_never_use_higher_ones() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    scan::check(
        &src,
        &[
            ("codec", 0),
            ("group", 0),
            ("secret", 0),
            ("gpu", 0),
            ("wait", 0),
            ("clock", 0),
            ("proto", 1),
            ("bootstrap", 1),
            ("pattern", 2),
            ("transport", 3),
            ("config", 4),
            ("stream", 4),
            ("comm", 5),
        ],
        // The crate root, the demo binary, and the fuzz targets' entry points.
        &["lib.rs", "bin", "fuzz_api.rs"],
    );
}
