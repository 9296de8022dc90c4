//! A tiny spin-then-park thread team for the decode loop's many small parallel calls.
//!
//! Decoding one token makes ~120 matrix–vector products of 20–500 µs each. With rayon, the
//! calling thread hands each one to the pool and sleeps, and every call pays two futex wake-ups
//! (measured: a quarter of decode time in the scheduler). Here the caller computes its own share,
//! and helpers busy-wait for the next call for a short while before parking, so a hand-off costs
//! an atomic store.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long an idle helper spins before parking.
const SPIN: Duration = Duration::from_micros(300);

type Job = *const (dyn Fn(usize) + Sync);

/// `next` between calls: past every part, and far enough from overflow that late helpers'
/// increments never wrap it around to a real part.
const CLOSED: usize = usize::MAX / 2;

struct Shared {
    /// Bumped once per call; helpers watch it.
    epoch: AtomicU64,
    /// The current call's closure; written only while no helper is running.
    job: UnsafeCell<Option<Job>>,
    /// The next part of the current call nobody has claimed yet.
    next: AtomicUsize,
    /// Parts of the current call other than the caller's first that have finished.
    finished: AtomicUsize,
    /// A helper panicked during the current call.
    panicked: AtomicBool,
    /// Per helper: parked (or about to park) and needs an unpark.
    sleeping: Vec<AtomicBool>,
}

// SAFETY: `job` is written by the caller only while no part runs and `next` is closed, and read
// by a helper only after it claimed a part through `next` (which the caller reopens, after
// writing the job, with a sequentially consistent store); the caller waits until every claimed
// part has finished (`finished`) before returning, so the closure outlives every use.
unsafe impl Sync for Shared {}
// SAFETY: as above; the raw closure pointer is only dereferenced under that protocol.
unsafe impl Send for Shared {}

struct Team {
    shared: Arc<Shared>,
    helpers: Vec<Thread>,
    busy: Mutex<()>,
}

fn team() -> &'static Team {
    static TEAM: OnceLock<Team> = OnceLock::new();
    TEAM.get_or_init(|| {
        let threads = candle_core::utils::get_num_threads().max(1);
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            next: AtomicUsize::new(CLOSED),
            finished: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleeping: (1..threads).map(|_| AtomicBool::new(false)).collect(),
        });
        let helpers = (1..threads)
            .filter_map(|part| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("reft-team-{part}"))
                    .spawn(move || helper(&shared, part))
                    .ok()
                    .map(|h| h.thread().clone())
            })
            .collect::<Vec<_>>();
        Team {
            shared,
            helpers,
            busy: Mutex::new(()),
        }
    })
}

fn helper(shared: &Shared, part: usize) {
    crate::cpu::set_flush_to_zero_on_this_thread();
    let mut seen = 0u64;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        let epoch = loop {
            let e = shared.epoch.load(Ordering::Acquire);
            if e != seen {
                break e;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(256) && start.elapsed() > SPIN {
                shared.sleeping[part - 1].store(true, Ordering::SeqCst);
                if shared.epoch.load(Ordering::SeqCst) == seen {
                    std::thread::park();
                }
                shared.sleeping[part - 1].store(false, Ordering::SeqCst);
            } else {
                std::hint::spin_loop();
            }
        };
        seen = epoch;
        run_claimed_parts(shared);
    }
}

/// Claims parts of the current call until none is left, running each. A part is claimed
/// before the job is read, and the caller waits for every claimed part, so the job is alive
/// whenever it is used.
fn run_claimed_parts(shared: &Shared) {
    let n = shared.sleeping.len() + 1;
    loop {
        let part = shared.next.fetch_add(1, Ordering::AcqRel);
        if part >= n {
            return;
        }
        // SAFETY: see `Shared`: the job was published before `next` was reset for this call,
        // and the caller keeps it alive until `finished` counts this part.
        let job = unsafe { (*shared.job.get()).expect("job published with the call") };
        let f = unsafe { &*job };
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(part))).is_err() {
            shared.panicked.store(true, Ordering::SeqCst);
        }
        shared.finished.fetch_add(1, Ordering::AcqRel);
    }
}

/// Number of parts [`for_each_part`] splits work into (the caller plus its helpers).
pub fn parts() -> usize {
    team().helpers.len() + 1
}

/// Runs `f(0)`, …, `f(parts() − 1)` concurrently, `f(0)` on the calling thread, and returns
/// when all are done. If another call is in flight (from another thread), runs them in turn here.
///
/// Helpers claim parts rather than own them: when a helper is slow to wake (another process
/// holds its core), the caller runs the parts nobody has claimed itself instead of waiting,
/// which on a shared two-core machine turned stalls of tens of milliseconds into none.
pub fn for_each_part(f: &(dyn Fn(usize) + Sync)) {
    let team = team();
    let n = team.helpers.len() + 1;
    let guard = match team.busy.try_lock() {
        Ok(g) if n > 1 => g,
        _ => {
            (0..n).for_each(f);
            return;
        }
    };
    let shared = &team.shared;
    // SAFETY: no part of an earlier call is running (that call waited for all of them) and
    // nobody reads `job` before claiming a part, which only the reset of `next` below allows. The lifetime is erased; we wait for every helper before
    // returning, so `f` outlives all uses.
    unsafe {
        let job: Job = std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f);
        *shared.job.get() = Some(job);
    }
    shared.finished.store(0, Ordering::SeqCst);
    shared.next.store(1, Ordering::SeqCst);
    shared.epoch.fetch_add(1, Ordering::SeqCst);
    for (i, t) in team.helpers.iter().enumerate() {
        if shared.sleeping[i].load(Ordering::SeqCst) {
            t.unpark();
        }
    }
    let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(0)));
    run_claimed_parts(shared);
    let mut spins = 0u32;
    while shared.finished.load(Ordering::Acquire) < n - 1 {
        // A helper is inside a part; if it is not running, let it have this core.
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(1024) {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
    // Late helpers find nothing to claim.
    shared.next.store(CLOSED, Ordering::SeqCst);
    // SAFETY: every helper is done with the job.
    unsafe { *shared.job.get() = None };
    let helper_panicked = shared.panicked.swap(false, Ordering::SeqCst);
    drop(guard);
    if let Err(p) = mine {
        std::panic::resume_unwind(p);
    }
    assert!(!helper_panicked, "a reft-team helper panicked");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_once_per_call() {
        for _ in 0..200 {
            let hits: Vec<AtomicUsize> = (0..parts()).map(|_| AtomicUsize::new(0)).collect();
            for_each_part(&|i| {
                hits[i].fetch_add(1, Ordering::SeqCst);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::SeqCst) == 1));
        }
    }

    #[test]
    fn concurrent_callers_are_served() {
        let total = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..100 {
                        for_each_part(&|_| {
                            total.fetch_add(1, Ordering::SeqCst);
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::SeqCst), 4 * 100 * parts());
    }
}
