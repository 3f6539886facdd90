//! glibc malloc settings for a process that allocates and frees tensors of tens of MB every
//! step.
//!
//! Why: by default glibc serves large blocks with fresh `mmap`s and unmaps them on free, so
//! every big tensor of every U-Net step is page-faulted in again and zeroed by the kernel.
//! Measured on 2 threads: a 320 -> 2560 linear layer over 8192 tokens (84 MB output) took
//! 85 ms that way and 59 ms with the blocks kept in the heap and reused. Freed memory is
//! handed back explicitly between components instead ([`release_free_memory`]), which keeps
//! the peak RSS where it was.

/// Keeps large blocks in the heap (no per-block `mmap`/`munmap`, no automatic trimming).
/// Called once when a pipeline is loaded; harmless to call again.
pub fn keep_freed_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        // SAFETY: mallopt only changes allocator parameters; called before the big allocations.
        ONCE.call_once(|| unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            // one arena: worker threads' 64 MB arenas would each keep their freed blocks too
            libc::mallopt(libc::M_ARENA_MAX, 1);
        });
    }
}

/// Hands memory freed by a dropped component back to the system, so that the next component
/// does not stack on top of it in the peak RSS.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}
