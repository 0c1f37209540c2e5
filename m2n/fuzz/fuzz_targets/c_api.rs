#![no_main]
//! See `m2n_c::fuzz_api::c_api` (the C ABI crate): sequences of C calls
//! with random arguments and handles on a live in-process group.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    m2n_c::fuzz_api::c_api(data);
});
