#![no_main]
//! The `/events` query and subject checks: the input is a query string,
//! then after a NUL byte the token's grants, one per line.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (query, grants) = text.split_once('\0').unwrap_or((&text, "events.>"));
    let grants: Vec<String> = grants.lines().map(String::from).collect();
    sse_relay::fuzzing::events_query(query, &grants);
});
