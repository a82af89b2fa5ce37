//! guest-init's layer unpacker on hostile tar streams (hull_fuzz::unpack).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hull_fuzz::unpack::run(data));
