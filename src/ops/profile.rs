//! Where a forward pass's time goes, per operation: with `SDGEN_PROFILE_OPS=1` each call of an
//! `ops` function waits for its device before and after (so a GPU's queued work is counted
//! where it runs) and adds its wall time to the operation's total; [`report`] gives the totals.
//! Waiting serialises the device, so the totals are an upper bound of each part and their sum
//! exceeds an unprofiled run; the rest of a pass (candle ops the models call directly: concat,
//! upsampling, reshapes) is the difference from its total. Off, a span costs one load of a
//! cached flag.

use candle_core::{Device, Tensor};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

fn on() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("SDGEN_PROFILE_OPS").as_deref() == Ok("1"))
}

static TOTALS: Mutex<BTreeMap<&'static str, (f64, usize)>> = Mutex::new(BTreeMap::new());

thread_local! {
    /// Spans open on this thread: an op calling another is counted once, as the outer.
    static DEPTH: Cell<usize> = const { Cell::new(0) };
}

/// One timed call; its time is added when it is dropped.
pub struct Span {
    timed: Option<(&'static str, Device, Instant)>,
}

/// Starts timing `name` on `x`'s device (when profiling is on and no span is open already).
pub fn span(name: &'static str, x: &Tensor) -> Span {
    if !on() {
        return Span { timed: None };
    }
    let outer = DEPTH.with(|d| {
        d.set(d.get() + 1);
        d.get() == 1
    });
    let timed = outer.then(|| {
        let dev = x.device().clone();
        let _ = dev.synchronize();
        (name, dev, Instant::now())
    });
    Span { timed }
}

impl Drop for Span {
    fn drop(&mut self) {
        if !on() {
            return;
        }
        DEPTH.with(|d| d.set(d.get() - 1));
        if let Some((name, dev, start)) = self.timed.take() {
            let _ = dev.synchronize();
            let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
            let entry = totals.entry(name).or_insert((0.0, 0));
            entry.0 += start.elapsed().as_secs_f64();
            entry.1 += 1;
        }
    }
}

/// The totals since the last call, one line per operation (seconds, calls), and clears them.
pub fn report() -> String {
    let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let mut lines: Vec<_> = totals.iter().map(|(k, v)| (*k, *v)).collect();
    lines.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    totals.clear();
    lines
        .iter()
        .map(|(name, (s, n))| format!("{name:>14} {:9.3} ms {n:5} calls\n", s * 1e3))
        .collect()
}
