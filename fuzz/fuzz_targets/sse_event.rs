#![no_main]
//! SSE encoding round-trips through a WHATWG parser: the input is an event
//! name, a NUL byte, then the payload.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (name, payload) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&data[..0], data),
    };
    let id = payload.len() as u64 * 7919;
    sse_relay::fuzzing::sse_event(id, &String::from_utf8_lossy(name), payload);
});
