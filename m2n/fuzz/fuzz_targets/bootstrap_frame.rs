#![no_main]
//! See `m2n::fuzz_api::bootstrap_frame`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    m2n::fuzz_api::bootstrap_frame(data);
});
