#![no_main]
//! See `m2n::fuzz_api::descriptors`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    m2n::fuzz_api::descriptors(data);
});
