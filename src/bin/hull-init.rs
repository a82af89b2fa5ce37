//! `hull-init`: PID 1 of every hull guest (see [`guest_init::init`]). A
//! binary of the hull package, so that building or installing hull gives
//! both; it must be static (the default target is musl).
//!
//! It defines the C `main` itself: Rust's usual start-up would abort when
//! descriptors 0-2 are closed and `/dev/null` does not exist yet (an
//! initramfs without `/dev/console`), and would ignore `SIGPIPE` for the
//! container's process. The init sets up both itself.

#![cfg_attr(not(test), no_main)]

#[cfg(not(test))]
#[no_mangle]
extern "C" fn main(
    _argc: std::ffi::c_int,
    _argv: *const *const std::ffi::c_char,
) -> std::ffi::c_int {
    guest_init::init::main()
}
