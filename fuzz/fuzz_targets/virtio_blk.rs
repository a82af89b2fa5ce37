//! virtio-blk behind virtio-mmio, driven by a hostile guest (hull_fuzz::virtio).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hull_fuzz::virtio::run(
    hull_fuzz::virtio::Kind::Blk,
    data
));
