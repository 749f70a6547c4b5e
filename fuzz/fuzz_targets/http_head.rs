#![no_main]
//! The HTTP/1.1 head parser on arbitrary bytes.

libfuzzer_sys::fuzz_target!(|data: &[u8]| sse_relay::fuzzing::http_head(data));
