//! The MoE runtime's layers only point down (see "Architecture" in the
//! README): the model (configuration, weights, families, tokenizer) at the
//! bottom, the workers and the planner above it, the launcher and the
//! benchmark above the workers, the server on top.

#[path = "../../tests/support/layers.rs"]
mod scan;

#[test]
fn lower_layers_never_use_higher_ones() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    scan::check(
        &src,
        &[
            ("model", 0),
            ("worker", 1),
            ("plan", 1),
            ("launch", 2),
            ("bench", 2),
            ("serve", 3),
        ],
        &["lib.rs", "bin"],
    );
}
