#![no_main]
//! See `m2n::fuzz_api::tcp_stream`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    m2n::fuzz_api::tcp_stream(data);
});
