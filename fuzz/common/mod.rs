//! What every libFuzzer target shares: the case is run by `kaizen_fuzz::runner::check` (a
//! panic that reaches it, or an error message with raw control characters, aborts the process
//! so libFuzzer saves the input), and half the mutations are kaizen-fuzz's structure-aware ones.

use kaizen_fuzz::mutate::{mutate, Rng};
use kaizen_fuzz::Target;

pub fn run(target: Target, data: &[u8]) {
    if let (Err(finding), _) = kaizen_fuzz::runner::check(target, data) {
        eprintln!("FINDING {}: {finding}", target.name());
        std::process::abort();
    }
}

pub fn mutate_in_place(
    target: Target,
    data: &mut [u8],
    size: usize,
    max_size: usize,
    seed: u32,
) -> usize {
    let mut rng = Rng::new(seed as u64);
    if rng.one_in(2) {
        return libfuzzer_sys::fuzzer_mutate(data, size, max_size);
    }
    let out = mutate(&data[..size], target.format(), &[], &mut rng);
    if out.len() > max_size {
        return libfuzzer_sys::fuzzer_mutate(data, size, max_size);
    }
    data[..out.len()].copy_from_slice(&out);
    out.len()
}
