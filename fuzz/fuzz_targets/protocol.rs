//! The host<->guest control stream's decoders (hull_fuzz::protocol).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hull_fuzz::protocol::run(data));
