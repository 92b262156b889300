//! A KVM-style shadow MMU kept coherent with a toy primary MMU through the
//! subsystem, under concurrent unmaps and faults.
//!
//! The secondary follows the KVM pattern: `invalidate_range_start`
//! zaps shadow entries and bumps an in-progress counter; `end` bumps the
//! sequence and drops the counter; the fault path samples the sequence, reads
//! the primary, and installs the shadow entry only if no invalidation
//! collided. At the end every shadow entry is checked against the primary.
//!
//! `cargo run --release -p mmu-notifier --example shadow_mmu -- [OPS_PER_THREAD]`

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Instant;

use mmu_notifier::{Again, Callbacks, Event, MmuNotifier, Range, Subscriptions, PAGE_SIZE};

/// KVM's `mmu_lock`-protected state.
#[derive(Default)]
struct ShadowState {
    in_progress: u64,
    seq: u64,
    /// Shadow page table: virtual page -> frame.
    spte: HashMap<u64, u64>,
}

#[derive(Default)]
struct ShadowMmu {
    state: Mutex<ShadowState>,
    retries: AtomicU64,
    zapped: AtomicU64,
}

impl MmuNotifier for ShadowMmu {
    fn callbacks(&self) -> Callbacks {
        Callbacks::INVALIDATE_RANGE_START | Callbacks::INVALIDATE_RANGE_END | Callbacks::RELEASE
    }
    fn invalidate_range_start(&self, r: &Range) -> Result<(), Again> {
        let mut s = self.state.lock().unwrap();
        s.in_progress += 1;
        let before = s.spte.len();
        s.spte
            .retain(|vpn, _| !r.overlaps(vpn * PAGE_SIZE, vpn * PAGE_SIZE + PAGE_SIZE - 1));
        self.zapped
            .fetch_add((before - s.spte.len()) as u64, Ordering::Relaxed);
        Ok(())
    }
    fn invalidate_range_end(&self, _r: &Range) {
        let mut s = self.state.lock().unwrap();
        s.seq += 1;
        s.in_progress -= 1;
    }
    fn release(&self) {
        self.state.lock().unwrap().spte.clear();
    }
}

/// The toy primary MMU: a page table and the subsystem hooks around changes.
struct Primary {
    mm: Subscriptions,
    pt: Mutex<HashMap<u64, u64>>,
    next_frame: AtomicU64,
}

impl Primary {
    fn map(&self, vpn: u64) {
        let f = self.next_frame.fetch_add(1, Ordering::Relaxed);
        self.pt.lock().unwrap().insert(vpn, f);
    }
    fn unmap(&self, vpn: u64) {
        let r = Range::from_len(vpn * PAGE_SIZE, PAGE_SIZE, Event::Unmap).unwrap();
        let inv = self.mm.invalidate_range_start(r);
        self.pt.lock().unwrap().remove(&vpn); // the frame is "freed" after end
        inv.end();
    }
}

/// The guest fault path with KVM's retry check.
fn fault(primary: &Primary, shadow: &ShadowMmu, vpn: u64) -> bool {
    loop {
        let seq = shadow.state.lock().unwrap().seq;
        let frame = primary.pt.lock().unwrap().get(&vpn).copied();
        let mut s = shadow.state.lock().unwrap();
        if s.in_progress != 0 || s.seq != seq {
            shadow.retries.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        match frame {
            Some(f) => {
                s.spte.insert(vpn, f);
                return true;
            }
            None => return false,
        }
    }
}

fn main() {
    let ops: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000);
    let primary = Arc::new(Primary {
        mm: Subscriptions::new(),
        pt: Mutex::new(HashMap::new()),
        next_frame: AtomicU64::new(1),
    });
    let shadow = Arc::new(ShadowMmu::default());
    let handle = primary.mm.register(shadow.clone()).expect("register");
    const PAGES: u64 = 256;
    for vpn in 0..PAGES {
        primary.map(vpn);
    }
    let t0 = Instant::now();
    let workers: Vec<_> = (0..2u64)
        .map(|t| {
            let (p, s) = (primary.clone(), shadow.clone());
            thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                let mut faults = 0u64;
                for _ in 0..ops {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let vpn = x % PAGES;
                    if t == 0 && x % 4 == 0 {
                        p.unmap(vpn);
                        p.map(vpn);
                    } else if fault(&p, &s, vpn) {
                        faults += 1;
                    }
                }
                faults
            })
        })
        .collect();
    let faults: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    let elapsed = t0.elapsed();

    // Coherence: every shadow entry maps what the primary maps now.
    let pt = primary.pt.lock().unwrap();
    let st = shadow.state.lock().unwrap();
    let stale = st
        .spte
        .iter()
        .filter(|(vpn, f)| pt.get(vpn) != Some(f))
        .count();
    println!("operations        {}", 2 * ops);
    println!("elapsed           {elapsed:.2?}");
    println!("faults installed  {faults}");
    println!(
        "fault retries     {}",
        shadow.retries.load(Ordering::Relaxed)
    );
    println!(
        "sptes zapped      {}",
        shadow.zapped.load(Ordering::Relaxed)
    );
    println!("sptes live        {}", st.spte.len());
    println!("stale sptes       {stale}");
    drop((pt, st));
    primary.mm.unregister(&handle).expect("unregister");
    if stale != 0 {
        eprintln!("coherence violation: {stale} stale shadow entries");
        std::process::exit(1);
    }
}
