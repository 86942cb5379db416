//! Wall time per stage of the vision encoder, for profiling on the CPU backend (where every op runs
//! when it is called; on GPU backends ops are queued and these times mean nothing). Off unless
//! [`start`] is called: a [`span`] then costs one atomic load.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use web_time::Instant;

static ON: AtomicBool = AtomicBool::new(false);
static TIMES: Mutex<Vec<(&'static str, f64)>> = Mutex::new(Vec::new());

/// Clears the totals and starts timing spans (in every thread).
pub fn start() {
    TIMES.lock().unwrap_or_else(|e| e.into_inner()).clear();
    ON.store(true, Ordering::SeqCst);
}

/// Stops timing; the seconds per stage name since [`start`], in the order stages first ran.
pub fn stop() -> Vec<(&'static str, f64)> {
    ON.store(false, Ordering::SeqCst);
    std::mem::take(&mut *TIMES.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Runs `f`, adding its wall time to `stage` while profiling is on. Spans should not nest (the
/// totals would count the inner time twice).
pub fn span<R>(stage: &'static str, f: impl FnOnce() -> R) -> R {
    if !ON.load(Ordering::Relaxed) {
        return f();
    }
    let t = Instant::now();
    let out = f();
    let seconds = t.elapsed().as_secs_f64();
    let mut times = TIMES.lock().unwrap_or_else(|e| e.into_inner());
    match times.iter_mut().find(|(name, _)| *name == stage) {
        Some((_, total)) => *total += seconds,
        None => times.push((stage, seconds)),
    }
    out
}
