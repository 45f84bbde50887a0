//! Heap policy for large tensors on the CPU, applied by `vdm run` unless told not to.
//!
//! glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh `mmap`
//! and returns it to the kernel on `free`. A UNet forward allocates and frees tens of GiB of
//! such activations, so every new tensor page-faults its memory back in, zeroed by the kernel:
//! a quarter of a full-size forward went to page faults and page clearing. Keeping freed memory
//! in the heap lets the next tensor of the same size reuse it. The price is that the process
//! keeps its high-water mark of heap memory until it exits, as PyTorch's caching allocator
//! keeps GPU memory.
//!
//! The setting is the host's, not a plugin's: it governs the whole process, so the program that
//! owns the process decides (`vdm run --no-retain-freed-memory` turns it off). Plugins share
//! the host's C library and therefore its allocator settings.

use std::sync::Once;

/// Switches glibc's allocator to serve large blocks from the heap and never to shrink it.
/// The first call applies it; later calls do nothing. A no-op off glibc.
pub fn retain_freed_memory() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes allocator parameters; blocks already handed out, whether
        // mmapped or from the heap, are freed correctly under any setting.
        unsafe {
            // No mmapped blocks: every allocation comes from (and returns to) the heap.
            libc::mallopt(libc::M_MMAP_MAX, 0);
            // Never give the top of the heap back to the kernel…
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            // …and grow it in steps of 256 MiB rather than one tensor at a time.
            libc::mallopt(libc::M_TOP_PAD, 256 << 20);
        }
    });
}
