#![no_main]
#[path = "../common/mod.rs"]
mod common;

use kaizen_fuzz::Target::ConfigJson as TARGET;

libfuzzer_sys::fuzz_target!(|data: &[u8]| common::run(TARGET, data));

libfuzzer_sys::fuzz_mutator!(|data: &mut [u8], size: usize, max_size: usize, seed: u32| {
    common::mutate_in_place(TARGET, data, size, max_size, seed)
});
