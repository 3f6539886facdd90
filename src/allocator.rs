//! The process's memory allocator: cache-line aligned large blocks, and glibc malloc settings
//! for a process that allocates and frees tensors of tens of MB every step.
//!
//! Why aligned: the AMX tile loads and stores move 64-byte rows. A tensor's data starts where
//! malloc put it, 16 bytes past a line boundary as often as not, and then every row of every
//! tile load straddles two cache lines. Measured on the bf16 U-Net step (512x512, batch 2,
//! 2 threads): 1.89-2.00 s with malloc's placement, 1.52-1.60 s with every block of 1 KiB or
//! more starting on a 64-byte boundary (linear layers 475 -> 374 ms, direct convolutions
//! 696 -> 537, attention 497 -> 370).
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

/// Every allocation of the process (the binary, the tests, the benchmarks: all link this
/// library) goes through [`LineAligned`].
#[global_allocator]
static GLOBAL: LineAligned = LineAligned;

/// Blocks of this many bytes or more start on a [`LINE`]-byte boundary.
const ALIGNED_FROM: usize = 1024;
/// The cache line (and AMX tile row) size.
const LINE: usize = 64;

/// The global allocator: the system allocator, with blocks of [`ALIGNED_FROM`] bytes or more
/// (and alignment at most [`LINE`]) placed on a [`LINE`]-byte boundary. Such a block is a
/// system block [`LINE`] bytes longer, the aligned start at most [`LINE`] bytes into it, and
/// the system block's address stored in the 8 bytes before the aligned start. Built on the
/// system allocator's plain calls (not its over-aligned ones) so that zeroed blocks keep
/// `calloc`'s untouched fresh pages and growing keeps `realloc`'s in-place growth.
pub struct LineAligned;

impl LineAligned {
    /// Whether a block of this layout gets the aligned placement (a pure function of the
    /// layout, so `dealloc` and `realloc` see what `alloc` did).
    fn placed(layout: std::alloc::Layout) -> bool {
        layout.size() >= ALIGNED_FROM && layout.align() <= LINE
    }

    /// The system layout behind a placed block of `size` bytes (none for a size within
    /// [`LINE`] of the largest layout: such an allocation fails).
    fn outer(size: usize) -> Option<std::alloc::Layout> {
        std::alloc::Layout::from_size_align(size.checked_add(LINE)?, 16).ok()
    }

    /// [`LineAligned::outer`] of a block that was allocated.
    fn outer_of_live(size: usize) -> std::alloc::Layout {
        Self::outer(size).expect("a live placed block has an outer layout")
    }

    /// The aligned start in the system block at `raw`: 16..=64 bytes in (raw is 16-aligned),
    /// room for the 8-byte record before it.
    ///
    /// # Safety
    /// `raw` is a system block of at least `LINE` bytes, 16-aligned.
    unsafe fn start(raw: *mut u8) -> *mut u8 {
        raw.add(LINE - (raw as usize % LINE))
    }

    /// The aligned start in the system block at `raw` (null stays null), with `raw` recorded
    /// before it.
    ///
    /// # Safety
    /// `raw` is null or a system block of at least `LINE` + the wanted size bytes, 16-aligned.
    unsafe fn place(raw: *mut u8) -> *mut u8 {
        if raw.is_null() {
            return raw;
        }
        let start = Self::start(raw);
        start.cast::<*mut u8>().sub(1).write(raw);
        start
    }

    /// A new block of `layout` from the system allocator's `system` call (`alloc` or
    /// `alloc_zeroed`), placed if [`LineAligned::placed`].
    ///
    /// # Safety
    /// As `GlobalAlloc::alloc`.
    unsafe fn new_block(
        layout: std::alloc::Layout,
        system: unsafe fn(&std::alloc::System, std::alloc::Layout) -> *mut u8,
    ) -> *mut u8 {
        if !Self::placed(layout) {
            return system(&std::alloc::System, layout);
        }
        match Self::outer(layout.size()) {
            Some(outer) => Self::place(system(&std::alloc::System, outer)),
            None => std::ptr::null_mut(),
        }
    }

    /// The system block behind the placed block at `ptr`.
    ///
    /// # Safety
    /// `ptr` came from [`LineAligned::place`].
    unsafe fn raw(ptr: *mut u8) -> *mut u8 {
        ptr.cast::<*mut u8>().sub(1).read()
    }
}

// SAFETY: every block is a live system block or lies inside one with the bytes it promises;
// `placed` decides the scheme from the layout alone, which the caller passes back unchanged.
unsafe impl std::alloc::GlobalAlloc for LineAligned {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        Self::new_block(
            layout,
            <std::alloc::System as std::alloc::GlobalAlloc>::alloc,
        )
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        Self::new_block(
            layout,
            <std::alloc::System as std::alloc::GlobalAlloc>::alloc_zeroed,
        )
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        if Self::placed(layout) {
            std::alloc::System.dealloc(Self::raw(ptr), Self::outer_of_live(layout.size()))
        } else {
            std::alloc::System.dealloc(ptr, layout)
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        let new_layout = std::alloc::Layout::from_size_align_unchecked(new_size, layout.align());
        match (Self::placed(layout), Self::placed(new_layout)) {
            (false, false) => std::alloc::System.realloc(ptr, layout, new_size),
            (true, true) => {
                let raw = Self::raw(ptr);
                let offset = ptr as usize - raw as usize;
                let Some(new_outer) = Self::outer(new_size) else {
                    return std::ptr::null_mut();
                };
                let outer = Self::outer_of_live(layout.size());
                let new_raw = std::alloc::System.realloc(raw, outer, new_outer.size());
                if new_raw.is_null() {
                    return new_raw;
                }
                // the system block may have moved to another offset from a line boundary:
                // the data moves to the new aligned start before the record is written
                let start = Self::start(new_raw);
                let data = new_raw.add(offset);
                if start != data {
                    std::ptr::copy(data, start, layout.size().min(new_size));
                }
                Self::place(new_raw)
            }
            _ => {
                // across the threshold: a new block, the data copied, the old block freed
                let new = self.alloc(new_layout);
                if !new.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
                new
            }
        }
    }
}

/// The machine's physical memory in bytes (`MemTotal` of /proc/meminfo), where known.
fn physical_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// `(needed, available)` in GiB when `need` bytes are more than the machine's physical
/// memory (where it is known): what the refusals of oversized requests print.
pub fn beyond_memory(need: u64) -> Option<(f64, f64)> {
    let have = physical_memory()?;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    (need > have).then(|| (gib(need), gib(have)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_line<T>(v: &[T]) -> bool {
        v.as_ptr() as usize % LINE == 0
    }

    #[test]
    fn large_blocks_start_on_lines_and_keep_their_data() {
        // growth from small to large and on: every reallocation path (system, across the
        // threshold, placed to placed) with the data checked after each
        let mut v: Vec<u8> = Vec::new();
        for i in 0..100_000u32 {
            v.push((i % 251) as u8);
            if v.capacity() >= ALIGNED_FROM {
                assert!(on_line(&v), "capacity {}", v.capacity());
            }
        }
        assert!(v.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
        // shrinking across the threshold and within the placed sizes
        v.truncate(50_000);
        v.shrink_to_fit();
        assert!(on_line(&v));
        v.truncate(100);
        v.shrink_to_fit();
        assert!(v.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
        // zeroed blocks, of both kinds, are zero
        for n in [10, ALIGNED_FROM - 1, ALIGNED_FROM, 1 << 20] {
            let z = vec![0u8; n];
            assert!(z.iter().all(|&b| b == 0));
            assert!(n < ALIGNED_FROM || on_line(&z));
        }
        // a size the outer block cannot have fails as an allocation, no overflow
        assert!(Vec::<u8>::new()
            .try_reserve(isize::MAX as usize - 8)
            .is_err());
        // an over-aligned type passes through with its own alignment
        #[repr(align(128))]
        struct Wide([u8; 128]);
        let w: Vec<Wide> = (0..20).map(|_| Wide([7; 128])).collect();
        assert_eq!(w.as_ptr() as usize % 128, 0);
        assert!(w.iter().all(|x| x.0.iter().all(|&b| b == 7)));
    }
}
