//! The committed header must be exactly what cbindgen generates from the
//! source. Regenerate with `M2N_BLESS=1 cargo test -p m2n-ffi --test header`.

#[test]
fn committed_header_matches_the_source() {
    let generated = include_str!(concat!(env!("OUT_DIR"), "/m2n.h"));
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/include/m2n.h");
    if std::env::var_os("M2N_BLESS").is_some() {
        std::fs::write(path, generated).expect("write include/m2n.h");
        return;
    }
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == generated,
        "ffi/include/m2n.h is stale: regenerate it with M2N_BLESS=1 cargo test -p m2n-ffi --test header"
    );
}
