//! A global allocator that counts live bytes and refuses any allocation that would take the
//! process past [`LIMIT`]: the refused allocation ends the process through Rust's allocation
//! error handler ("memory allocation of N bytes failed"), after the runner saved the case
//! (`runner` writes each input to `current` before running it). Installed by the harness
//! binary and the fuzz test, never by kaizen itself.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Live bytes the harness may hold: 1 GiB, the bound for any one input.
pub const LIMIT: usize = 1 << 30;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

pub struct Counting;

/// Live bytes now, and the most seen since [`reset_peak`].
pub fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

pub fn peak() -> usize {
    PEAK.load(Ordering::Relaxed)
}

pub fn reset_peak() {
    PEAK.store(live(), Ordering::Relaxed);
}

fn reserve(size: usize) -> bool {
    let before = LIVE.fetch_add(size, Ordering::Relaxed);
    let now = before.saturating_add(size);
    if now > LIMIT {
        LIVE.fetch_sub(size, Ordering::Relaxed);
        // No allocation here: a fixed message, then Rust's handler prints the size and aborts.
        eprintln!(
            "FINDING: live memory would pass 1 GiB; the case being run is the `current-*` file \
             in the findings directory"
        );
        return false;
    }
    PEAK.fetch_max(now, Ordering::Relaxed);
    true
}

// SAFETY: every call is passed to `System` unchanged; only the counting is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !reserve(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = System.alloc(layout);
        if p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !reserve(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = System.alloc_zeroed(layout);
        if p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = layout.size();
        if new_size > old && !reserve(new_size - old) {
            return std::ptr::null_mut();
        }
        let p = System.realloc(ptr, layout, new_size);
        if p.is_null() {
            if new_size > old {
                LIVE.fetch_sub(new_size - old, Ordering::Relaxed);
            }
        } else if new_size < old {
            LIVE.fetch_sub(old - new_size, Ordering::Relaxed);
        }
        p
    }
}
