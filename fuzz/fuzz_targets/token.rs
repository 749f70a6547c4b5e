#![no_main]
//! Token verification on arbitrary bytes.

libfuzzer_sys::fuzz_target!(|data: &[u8]| sse_relay::fuzzing::token(data));
