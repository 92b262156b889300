//! Invalidation counting and Chrome trace-event export (`--trace FILE`,
//! opens in Perfetto / chrome://tracing): one track per thread, spans for
//! invalidate start..end and for secondary faults (fault..retry), instant
//! events for oracle checks and violations.

use std::cell::Cell;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use mmu_notifier::{Again, Callbacks, Event, MmuNotifier, Range};
use softmm::{OracleObserver, Violation};

/// Events kept at most (a longer run keeps its first events).
const MAX_EVENTS: usize = 2_000_000;

struct Rec {
    name: String,
    ph: char,
    ts: u64,
    tid: usize,
}

/// The trace buffer of one run.
pub struct Tracer {
    start: Instant,
    events: Mutex<Vec<Rec>>,
    dropped: AtomicU64,
}

static TRACER: OnceLock<Arc<Tracer>> = OnceLock::new();
static NEXT_TID: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    static TID: Cell<usize> = const { Cell::new(0) };
}

fn tid() -> usize {
    TID.with(|t| {
        if t.get() == 0 {
            t.set(NEXT_TID.fetch_add(1, Ordering::Relaxed));
        }
        t.get()
    })
}

impl Tracer {
    /// Turns tracing on for this process.
    pub fn enable() -> Arc<Tracer> {
        TRACER
            .get_or_init(|| {
                Arc::new(Tracer {
                    start: Instant::now(),
                    events: Mutex::new(Vec::new()),
                    dropped: AtomicU64::new(0),
                })
            })
            .clone()
    }

    fn push(&self, name: String, ph: char) {
        let ts = self.start.elapsed().as_micros() as u64;
        let mut ev = self.events.lock().unwrap_or_else(|e| e.into_inner());
        if ev.len() >= MAX_EVENTS {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        ev.push(Rec {
            name,
            ph,
            ts,
            tid: tid(),
        });
    }

    /// Writes the Chrome trace-event JSON.
    ///
    /// # Errors
    /// I/O errors.
    pub fn write(&self, path: &Path) -> std::io::Result<u64> {
        let ev = self.events.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = BufWriter::new(File::create(path)?);
        writeln!(out, "{{\"traceEvents\":[")?;
        for (i, e) in ev.iter().enumerate() {
            let sep = if i + 1 == ev.len() { "" } else { "," };
            let mut obj = serde_json::json!({
                "name": e.name, "ph": e.ph.to_string(), "ts": e.ts, "pid": 1, "tid": e.tid,
            });
            if e.ph == 'i' {
                obj["s"] = "t".into();
            }
            writeln!(out, "{obj}{sep}")?;
        }
        writeln!(out, "],\"displayTimeUnit\":\"ns\"}}")?;
        out.flush()?;
        Ok(ev.len() as u64)
    }
}

/// Whether `--trace` turned tracing on.
pub fn is_enabled() -> bool {
    TRACER.get().is_some()
}

fn tracer() -> Option<&'static Arc<Tracer>> {
    TRACER.get()
}

/// Opens a span on this thread's track (no-op unless tracing).
pub fn begin(name: impl FnOnce() -> String) {
    if let Some(t) = tracer() {
        t.push(name(), 'B');
    }
}

/// Closes the innermost span on this thread's track.
pub fn end() {
    if let Some(t) = tracer() {
        t.push(String::new(), 'E');
    }
}

/// Runs `f` inside a span.
pub fn span<T>(name: &'static str, f: impl FnOnce() -> T) -> T {
    begin(|| name.to_string());
    let r = f();
    end();
    r
}

/// Counts invalidations by event on every address space it is registered
/// on, and traces them as spans.
#[derive(Default)]
pub struct Monitor {
    counts: [AtomicU64; 8],
}

impl Monitor {
    /// Invalidations of `e` seen so far.
    pub fn count(&self, e: Event) -> u64 {
        self.counts[e as usize].load(Ordering::Relaxed)
    }
}

impl MmuNotifier for Monitor {
    fn callbacks(&self) -> Callbacks {
        Callbacks::INVALIDATE_RANGE_START | Callbacks::INVALIDATE_RANGE_END
    }

    fn invalidate_range_start(&self, r: &Range) -> Result<(), Again> {
        self.counts[r.event() as usize].fetch_add(1, Ordering::Relaxed);
        begin(|| {
            format!(
                "invalidate {:?} [{:#x}, {:#x})",
                r.event(),
                r.start(),
                r.end()
            )
        });
        Ok(())
    }

    fn invalidate_range_end(&self, _r: &Range) {
        end();
    }
}

/// Traces oracle checks as instant events.
pub struct CheckTracer;

impl OracleObserver for CheckTracer {
    fn checked(&self, mm: u64, vaddr: u64, write: bool, violation: Option<&Violation>) {
        let Some(t) = tracer() else { return };
        let name = match violation {
            None => format!("check mm{mm} {:#x}{}", vaddr, if write { " w" } else { "" }),
            Some(v) => format!("VIOLATION mm{mm} {:#x}: {:?}", vaddr, v.kind),
        };
        t.push(name, 'i');
    }
}
