//! `cargo fuzz` target: a sequence of driver and host operations on one virtio-blk queue
//! (see `backends::fuzzing::blk_engine` for the encoding and what is asserted after each
//! call). The counting allocator lets the harness check the heap the engine holds.
#![no_main]

#[global_allocator]
static ALLOC: backends::fuzzing::heap::CountingAlloc = backends::fuzzing::heap::CountingAlloc;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    backends::fuzzing::fuzz_blk_engine(data);
});
