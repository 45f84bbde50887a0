//! A global allocator that counts live heap bytes and refuses to go past a cap.
//!
//! A reader that trusts a size field in a corrupt file asks for gigabytes; on a shared machine
//! that must fail fast rather than swap, and the fuzzer must say which input did it. Refusing
//! the request makes Rust abort the process ("memory allocation of N bytes failed"), which the
//! supervising process reports as a crash of the case that was running (see `main.rs`). Below
//! the cap, the peak of each case is measured and reported when it exceeds the per-case limit.
//!
//! Install it with `#[global_allocator] static A: CappedAllocator = CappedAllocator;` in the
//! binary or test that runs the cases; without it the counters stay at zero and the allocation
//! checks are off.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static CAP: AtomicUsize = AtomicUsize::new(usize::MAX);

/// The counting, capped allocator (a thin layer over the system allocator).
pub struct CappedAllocator;

fn reserve(size: usize) -> bool {
    let live = LIVE.fetch_add(size, Ordering::Relaxed).saturating_add(size);
    if live > CAP.load(Ordering::Relaxed) {
        LIVE.fetch_sub(size, Ordering::Relaxed);
        return false;
    }
    PEAK.fetch_max(live, Ordering::Relaxed);
    true
}

fn release(size: usize) {
    LIVE.fetch_sub(size, Ordering::Relaxed);
}

// SAFETY: every call forwards to the system allocator with the caller's layout; the counters
// only decide whether to forward, and a refusal is the null pointer the trait allows.
unsafe impl GlobalAlloc for CappedAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !reserve(layout.size()) {
            return std::ptr::null_mut();
        }
        let ptr = System.alloc(layout);
        if ptr.is_null() {
            release(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !reserve(layout.size()) {
            return std::ptr::null_mut();
        }
        let ptr = System.alloc_zeroed(layout);
        if ptr.is_null() {
            release(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        release(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = layout.size();
        if new_size > old && !reserve(new_size - old) {
            return std::ptr::null_mut();
        }
        let new = System.realloc(ptr, layout, new_size);
        if new.is_null() {
            if new_size > old {
                release(new_size - old);
            }
        } else if new_size < old {
            release(old - new_size);
        }
        new
    }
}

/// Sets the most heap the process may hold at once; a request past it aborts the process.
pub fn set_cap(bytes: usize) {
    CAP.store(bytes, Ordering::Relaxed);
}

/// Whether the counting allocator is the global one (it has seen the allocations made so far).
pub fn installed() -> bool {
    LIVE.load(Ordering::Relaxed) > 0
}

/// Starts measuring a case: the peak restarts from the bytes live now, which are returned.
pub fn start_case() -> usize {
    let live = LIVE.load(Ordering::Relaxed);
    PEAK.store(live, Ordering::Relaxed);
    live
}

/// The most bytes held at once since [`start_case`].
pub fn peak() -> usize {
    PEAK.load(Ordering::Relaxed)
}
