//! `cargo fuzz` target: the input is the guest memory of one queue (see
//! `backends::fuzzing` for its layout), run once through the engine.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    backends::fuzzing::fuzz_block_request(data);
});
