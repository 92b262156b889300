//! `mmun run FILE...`: scenario files (TOML) describing address spaces,
//! attached mirrors, operations (optionally on threads) and expectations.
//! The format is documented in `scenarios/README.md`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use mirrors::{DmirrorError, MirrorError, MrEntry};
use mmu_notifier::Event;
use serde::Deserialize;
use softmm::{MapKind, Mm, MmGrab, PhysMem, Prot, SharedObject, PAGE_SIZE};

use crate::trace::Monitor;
use crate::world::Mirrors;

/// A scenario file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// What the scenario shows.
    pub description: Option<String>,
    /// Frames of the machine (default 4096).
    pub frames: Option<usize>,
    /// The steps, in order.
    #[serde(default)]
    pub step: Vec<toml::Spanned<Step>>,
}

/// One step. `op` says what it does; the other fields are its arguments.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// The operation.
    pub op: String,
    /// Address space name.
    pub mm: Option<String>,
    /// Name bound by this step (address space, mapping, registration, thread).
    pub name: Option<String>,
    /// Address: a number or `name` / `name+N` (N pages after a mapping).
    pub addr: Option<toml::Value>,
    /// Fixed address for mmap / target for mremap.
    pub to: Option<toml::Value>,
    /// Page count.
    pub pages: Option<u64>,
    /// New page count (mremap).
    pub new_pages: Option<u64>,
    /// `none`, `r`, `rw`.
    pub prot: Option<String>,
    /// `anon`, `shared`, `file`.
    pub kind: Option<String>,
    /// `dontneed` or `free`.
    pub advice: Option<String>,
    /// Byte written or expected.
    pub value: Option<u8>,
    /// Write access.
    pub write: Option<bool>,
    /// Registration name (`reg_check`).
    pub reg: Option<String>,
    /// Repeat count for `spawn`.
    pub repeat: Option<u64>,
    /// Steps of a spawned thread.
    pub steps: Option<Vec<Step>>,
    /// Expected error label (`NotMapped`, `Protection`, `EFAULT`, `ENOENT`,
    /// `Released`, ...), or `any`: success or any error (racing threads).
    pub expect_error: Option<String>,
    /// Expected outcome of a secondary access: `fault` (no translation).
    pub expect: Option<String>,
    /// Expected byte read.
    pub expect_value: Option<u8>,
    /// Expected `cpages` of a device command.
    pub expect_cpages: Option<u64>,
    /// Expected `faults` of a device command.
    pub expect_faults: Option<u64>,
    /// Expected snapshot bytes.
    pub expect_bytes: Option<Vec<u8>>,
    /// Expected count (pages referenced, merged, migrated...).
    pub expect_count: Option<u64>,
    /// `check`: expected oracle violations.
    pub violations: Option<u64>,
    /// `check`: expected invalidation counts by event name (cumulative).
    pub invalidations: Option<HashMap<String, u64>>,
}

struct Space {
    mm: Mutex<Option<Mm>>,
    mirrors: Mutex<Option<Arc<Mirrors>>>,
    file: Arc<SharedObject>,
}

/// A thread started by `spawn`.
type Worker = std::thread::JoinHandle<Result<(), String>>;

/// The state a scenario runs in.
pub struct World {
    phys: Arc<PhysMem>,
    monitor: Arc<Monitor>,
    spaces: Mutex<HashMap<String, Arc<Space>>>,
    addrs: Mutex<HashMap<String, u64>>,
    regs: Mutex<HashMap<String, MrEntry<MmGrab>>>,
    threads: Mutex<Vec<(String, Worker)>>,
    next_owner: Mutex<u64>,
}

fn label_mm(e: &softmm::Error) -> String {
    let s = format!("{e:?}");
    s.split([' ', '{', '(']).next().unwrap_or("").to_string()
}

fn label_mirror(e: &MirrorError) -> String {
    match e {
        MirrorError::Primary(p) => label_mm(p),
        MirrorError::Violation(_) => "Violation".into(),
        MirrorError::Released => "Released".into(),
        MirrorError::Busy => "Busy".into(),
        MirrorError::OutOfRange { .. } => "OutOfRange".into(),
        _ => "Notifier".into(),
    }
}

fn label_dev(e: &DmirrorError) -> String {
    match e {
        DmirrorError::Violation => "Violation".into(),
        other => other.to_string(),
    }
}

/// An operation's result: the error label if it failed.
type Outcome = Result<(), (String, String)>;

fn fail_mm(e: softmm::Error) -> (String, String) {
    (label_mm(&e), e.to_string())
}

fn fail_mirror(e: MirrorError) -> (String, String) {
    (label_mirror(&e), e.to_string())
}

fn fail_dev(e: DmirrorError) -> (String, String) {
    (label_dev(&e), e.to_string())
}

impl World {
    fn new(frames: usize) -> Arc<World> {
        let phys = PhysMem::new(frames);
        if crate::trace::is_enabled() {
            phys.oracle()
                .set_observer(Some(Arc::new(crate::trace::CheckTracer)));
        }
        Arc::new(World {
            phys,
            monitor: Arc::new(Monitor::default()),
            spaces: Mutex::new(HashMap::new()),
            addrs: Mutex::new(HashMap::new()),
            regs: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
            next_owner: Mutex::new(1),
        })
    }

    fn space(&self, s: &Step) -> Result<Arc<Space>, String> {
        let name = s.mm.as_deref().unwrap_or("main");
        self.spaces
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .ok_or_else(|| format!("unknown address space {name:?} (create it with op = \"mm\")"))
    }

    fn mm(&self, s: &Step) -> Result<Mm, String> {
        let sp = self.space(s)?;
        let g = sp.mm.lock().unwrap();
        g.as_ref().cloned().ok_or_else(|| {
            format!(
                "address space {:?} has exited",
                s.mm.as_deref().unwrap_or("main")
            )
        })
    }

    fn mirrors(&self, s: &Step) -> Result<Arc<Mirrors>, String> {
        self.space(s)?
            .mirrors
            .lock()
            .unwrap()
            .clone()
            .ok_or_else(|| {
                "no mirrors attached to this address space (op = \"attach\")".to_string()
            })
    }

    fn addr_of(&self, v: &toml::Value) -> Result<u64, String> {
        match v {
            toml::Value::Integer(i) => {
                u64::try_from(*i).map_err(|_| format!("negative address {i}"))
            }
            toml::Value::String(s) => {
                let (name, off) = match s.split_once('+') {
                    Some((n, o)) => (
                        n.trim(),
                        o.trim()
                            .parse::<u64>()
                            .map_err(|_| format!("bad page offset in {s:?}"))?,
                    ),
                    None => (s.trim(), 0),
                };
                let base = *self
                    .addrs
                    .lock()
                    .unwrap()
                    .get(name)
                    .ok_or_else(|| format!("unknown mapping name {name:?}"))?;
                off.checked_mul(PAGE_SIZE)
                    .and_then(|o| base.checked_add(o))
                    .ok_or_else(|| format!("address {s:?} overflows"))
            }
            other => Err(format!(
                "an address must be a number or a name, not {other}"
            )),
        }
    }

    fn addr(&self, s: &Step) -> Result<u64, String> {
        self.addr_of(s.addr.as_ref().ok_or("missing addr")?)
    }

    fn bind(&self, s: &Step, v: u64) {
        if let Some(n) = &s.name {
            self.addrs.lock().unwrap().insert(n.clone(), v);
        }
    }
}

fn prot(s: &Step) -> Result<Prot, String> {
    match s.prot.as_deref().unwrap_or("rw") {
        "none" => Ok(Prot::NONE),
        "r" | "read" => Ok(Prot::READ),
        "rw" => Ok(Prot::RW),
        p => Err(format!("unknown prot {p:?} (none, r, rw)")),
    }
}

/// Page counts above this are refused (device commands allocate buffers of
/// that size).
pub const MAX_PAGES: u64 = 1 << 16;

fn pages_of(n: Option<u64>) -> Result<u64, String> {
    match n.unwrap_or(1) {
        n if n <= MAX_PAGES => Ok(n),
        n => Err(format!(
            "pages = {n} is more than the {MAX_PAGES} a scenario may use"
        )),
    }
}

fn npages(s: &Step) -> Result<u64, String> {
    pages_of(s.pages)
}

fn len(s: &Step) -> Result<u64, String> {
    Ok(npages(s)? * PAGE_SIZE)
}

fn event_named(name: &str) -> Result<Event, String> {
    Event::ALL
        .into_iter()
        .find(|e| format!("{e:?}").eq_ignore_ascii_case(name.replace('_', "").as_str()))
        .ok_or_else(|| format!("unknown event {name:?}"))
}

fn expect_eq<T: PartialEq + std::fmt::Debug>(
    what: &str,
    want: Option<T>,
    got: T,
) -> Result<(), String> {
    match want {
        Some(w) if w != got => Err(format!("expected {what} {w:?}, got {got:?}")),
        _ => Ok(()),
    }
}

/// Runs one step; `Err` is a failed expectation or a bad step.
fn step(w: &Arc<World>, s: &Step) -> Result<(), String> {
    let outcome: Outcome = match s.op.as_str() {
        "mm" => {
            let name = s.name.clone().ok_or("op mm needs a name")?;
            let mm = Mm::new(&w.phys);
            mm.subscriptions()
                .register(w.monitor.clone())
                .map_err(|e| e.to_string())?;
            let file =
                SharedObject::new_file(&w.phys, 64, b"scenario file").map_err(|e| e.to_string())?;
            w.spaces.lock().unwrap().insert(
                name,
                Arc::new(Space {
                    mm: Mutex::new(Some(mm)),
                    mirrors: Mutex::new(None),
                    file,
                }),
            );
            Ok(())
        }
        "fork" => {
            let parent = w.space(s)?;
            let name = s.name.clone().ok_or("op fork needs a name for the child")?;
            let mm = w.mm(s)?;
            match mm.fork() {
                Ok(child) => {
                    w.spaces.lock().unwrap().insert(
                        name,
                        Arc::new(Space {
                            mm: Mutex::new(Some(child)),
                            mirrors: Mutex::new(None),
                            file: parent.file.clone(),
                        }),
                    );
                    Ok(())
                }
                Err(e) => Err(fail_mm(e)),
            }
        }
        "exit" => {
            let sp = w.space(s)?;
            *sp.mirrors.lock().unwrap() = None;
            let mm = sp.mm.lock().unwrap().take();
            drop(mm);
            Ok(())
        }
        "attach" => {
            let sp = w.space(s)?;
            let mm = w.mm(s)?;
            let owner = {
                let mut o = w.next_owner.lock().unwrap();
                *o += 1;
                *o
            };
            let m = Mirrors::attach(&mm, mmu_notifier::Owner(owner))?;
            *sp.mirrors.lock().unwrap() = Some(Arc::new(m));
            Ok(())
        }
        "mmap" => {
            let mm = w.mm(s)?;
            let sp = w.space(s)?;
            let kind = match s.kind.as_deref().unwrap_or("anon") {
                "anon" => MapKind::AnonPrivate,
                "shared" => MapKind::AnonShared,
                "file" => MapKind::File {
                    file: sp.file.clone(),
                    pgoff: 0,
                },
                "hugetlb" => MapKind::Hugetlb { shared: false },
                "hugetlb_shared" => MapKind::Hugetlb { shared: true },
                k => {
                    return Err(format!(
                        "unknown kind {k:?} (anon, shared, file, hugetlb, hugetlb_shared)"
                    ))
                }
            };
            let r = match &s.to {
                Some(at) => mm.mmap_fixed(w.addr_of(at)?, len(s)?, prot(s)?, kind),
                None => mm.mmap(len(s)?, prot(s)?, kind),
            };
            r.map(|a| w.bind(s, a)).map_err(fail_mm)
        }
        "munmap" => w.mm(s)?.munmap(w.addr(s)?, len(s)?).map_err(fail_mm),
        "mremap" => {
            let mm = w.mm(s)?;
            let new = pages_of(s.new_pages.or(s.pages))? * PAGE_SIZE;
            let r = match &s.to {
                Some(t) => mm.mremap_fixed(w.addr(s)?, len(s)?, new, w.addr_of(t)?),
                None => mm.mremap(w.addr(s)?, len(s)?, new, true),
            };
            r.map(|a| w.bind(s, a)).map_err(fail_mm)
        }
        "mprotect" => w
            .mm(s)?
            .mprotect(w.addr(s)?, len(s)?, prot(s)?)
            .map_err(fail_mm),
        "madvise" => {
            let mm = w.mm(s)?;
            match s.advice.as_deref() {
                Some("dontneed") => mm.madvise_dontneed(w.addr(s)?, len(s)?).map_err(fail_mm),
                Some("free") => mm.madvise_free(w.addr(s)?, len(s)?).map_err(fail_mm),
                Some("hugepage") => mm.madvise_hugepage(w.addr(s)?, len(s)?).map_err(fail_mm),
                Some("nohugepage") => mm.madvise_nohugepage(w.addr(s)?, len(s)?).map_err(fail_mm),
                a => {
                    return Err(format!(
                        "unknown advice {a:?} (dontneed, free, hugepage, nohugepage)"
                    ))
                }
            }
        }
        "write" => w
            .mm(s)?
            .write(w.addr(s)?, &[s.value.unwrap_or(1)])
            .map_err(fail_mm),
        "read" => {
            let mut b = [0u8];
            match w.mm(s)?.read(w.addr(s)?, &mut b) {
                Ok(()) => {
                    expect_eq("value", s.expect_value, b[0])?;
                    Ok(())
                }
                Err(e) => Err(fail_mm(e)),
            }
        }
        "ksm" | "migrate" | "swap_out" | "age" | "writeback" => {
            let mm = w.mm(s)?;
            let (a, l) = (w.addr(s)?, len(s)?);
            let r = match s.op.as_str() {
                "ksm" => mm.ksm_merge(a, l),
                "migrate" => mm.migrate_pages(a, l),
                "swap_out" => mm.swap_out(a, l),
                "age" => mm.age(a, l),
                _ => mm.writeback(a, l),
            };
            match r {
                Ok(n) => {
                    expect_eq("count", s.expect_count, n as u64)?;
                    Ok(())
                }
                Err(e) => Err(fail_mm(e)),
            }
        }
        "collapse" => match w.mm(s)?.collapse(w.addr(s)?) {
            Ok(c) => {
                let done = u64::from(c == softmm::Collapse::Collapsed);
                expect_eq("blocks collapsed", s.expect_count, done)?;
                Ok(())
            }
            Err(e) => Err(fail_mm(e)),
        },
        "huge" => {
            let mapped = u64::from(w.mm(s)?.is_pmd_mapped(w.addr(s)?));
            expect_eq("PMD-mapped", s.expect_count, mapped)?;
            Ok(())
        }
        "soft_dirty" => {
            w.mm(s)?.clear_soft_dirty();
            Ok(())
        }
        "oom_reap" => {
            let r = w.mm(s)?.oom_reap();
            expect_eq("VMAs left to retry", s.expect_count, r.retry.len() as u64)?;
            Ok(())
        }
        "kvm_fault" => w
            .mirrors(s)?
            .kvm
            .fault(w.addr(s)?, s.write.unwrap_or(false))
            .map_err(fail_mirror),
        "kvm_read" | "kvm_write" => {
            let m = w.mirrors(s)?;
            let a = w.addr(s)?;
            let r = if s.op == "kvm_read" {
                m.kvm.read(a)
            } else {
                m.kvm
                    .write(a, s.value.unwrap_or(1))
                    .map(|ok| ok.then_some(0))
            };
            match r {
                Ok(v) => {
                    if s.expect.as_deref() == Some("fault") && v.is_some() {
                        return Err(
                            "expected the access to fault (no shadow PTE), it went through".into(),
                        );
                    }
                    if s.expect.is_none() && v.is_none() {
                        return Err(
                            "the access found no shadow PTE (add expect = \"fault\" if intended)"
                                .into(),
                        );
                    }
                    if s.op == "kvm_read" {
                        if let Some(v) = v {
                            expect_eq("value", s.expect_value, v)?;
                        }
                    }
                    Ok(())
                }
                Err(e) => Err(fail_mirror(e)),
            }
        }
        "device_read"
        | "device_write"
        | "device_migrate"
        | "device_migrate_back"
        | "device_exclusive" => {
            let m = w.mirrors(s)?;
            let (a, n) = (w.addr(s)?, npages(s)?);
            let r = match s.op.as_str() {
                "device_read" => m.dev.read(a, n).map(|(d, c)| (Some(d), c)),
                "device_write" => m
                    .dev
                    .write(a, &vec![s.value.unwrap_or(1); len(s)? as usize])
                    .map(|c| (None, c)),
                "device_migrate" => m.dev.migrate_to_device(a, n).map(|(d, c)| (Some(d), c)),
                "device_exclusive" => m.dev.exclusive(a, n).map(|(d, c)| (Some(d), c)),
                _ => m.dev.migrate_to_system(a, n).map(|c| (None, c)),
            };
            match r {
                Ok((data, cmd)) => {
                    expect_eq("cpages", s.expect_cpages, cmd.cpages)?;
                    expect_eq("faults", s.expect_faults, cmd.faults)?;
                    if let (Some(v), Some(d)) = (s.expect_value, data) {
                        expect_eq("first byte", Some(v), d[0])?;
                    }
                    Ok(())
                }
                Err(e) => Err(fail_dev(e)),
            }
        }
        "device_snapshot" => {
            let m = w.mirrors(s)?;
            match m.dev.snapshot(w.addr(s)?, npages(s)?) {
                Ok((bytes, _)) => {
                    expect_eq("snapshot", s.expect_bytes.clone(), bytes)?;
                    Ok(())
                }
                Err(e) => Err(fail_dev(e)),
            }
        }
        "tlb_access" => {
            let m = w.mirrors(s)?;
            let store = s.write.unwrap_or(false).then_some(s.value.unwrap_or(1));
            match m.tlb.access(w.addr(s)?, store) {
                Ok(v) => {
                    if store.is_none() {
                        expect_eq("value", s.expect_value, v)?;
                    }
                    Ok(())
                }
                Err(e) => Err(fail_mirror(e)),
            }
        }
        "reg_get" => {
            let m = w.mirrors(s)?;
            match m.cache.get(w.addr(s)?, len(s)?, s.write.unwrap_or(false)) {
                Ok(r) => {
                    if let Some(n) = &s.name {
                        w.regs.lock().unwrap().insert(n.clone(), r);
                    }
                    Ok(())
                }
                Err(e) => Err(fail_mirror(e)),
            }
        }
        "reg_check" => {
            let m = w.mirrors(s)?;
            let name = s.reg.as_deref().ok_or("reg_check needs reg")?;
            let r = w
                .regs
                .lock()
                .unwrap()
                .get(name)
                .cloned()
                .ok_or_else(|| format!("unknown registration {name:?}"))?;
            m.cache
                .check(&r, w.addr(s)?, s.write.unwrap_or(false))
                .map_err(fail_mirror)
        }
        "check" => {
            let oracle = w.phys.oracle();
            expect_eq("oracle violations", s.violations, oracle.violation_count())?;
            for (ev, want) in s.invalidations.iter().flatten() {
                let e = event_named(ev)?;
                expect_eq(
                    &format!("{ev} invalidations"),
                    Some(*want),
                    w.monitor.count(e),
                )?;
            }
            Ok(())
        }
        "spawn" => {
            let steps = s.steps.clone().ok_or("spawn needs steps")?;
            let repeat = s.repeat.unwrap_or(1);
            let name = s.name.clone().unwrap_or_else(|| "thread".into());
            let w2 = w.clone();
            let h = std::thread::spawn(move || {
                for i in 0..repeat {
                    for (j, st) in steps.iter().enumerate() {
                        step(&w2, st)
                            .map_err(|e| format!("iteration {i}, inner step {}: {e}", j + 1))?;
                    }
                }
                Ok(())
            });
            w.threads.lock().unwrap().push((name, h));
            Ok(())
        }
        "join" => {
            let hs = std::mem::take(&mut *w.threads.lock().unwrap());
            for (name, h) in hs {
                h.join()
                    .map_err(|_| format!("thread {name:?} panicked"))?
                    .map_err(|e| format!("thread {name:?}: {e}"))?;
            }
            Ok(())
        }
        other => return Err(format!("unknown op {other:?}")),
    };
    match (outcome, s.expect_error.as_deref()) {
        (Ok(()), None) => Ok(()),
        (Ok(()), Some("any")) => Ok(()),
        (Ok(()), Some(want)) => Err(format!("expected error {want}, the operation succeeded")),
        (Err((_, msg)), Some("any")) => {
            let _ = msg;
            Ok(())
        }
        (Err((label, _)), Some(want)) if label == want => Ok(()),
        (Err((label, msg)), Some(want)) => {
            Err(format!("expected error {want}, got {label}: {msg}"))
        }
        (Err((label, msg)), None) => Err(format!("unexpected error {label}: {msg}")),
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Runs one scenario file and returns its description and step count; the
/// error names the file and line.
///
/// # Errors
/// A parse error, a bad step, or a failed expectation, as `file:line: what`.
pub fn run_file(path: &Path) -> Result<(String, usize), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    run_text(&path.display().to_string(), &text)
}

/// Runs a scenario given as text; `origin` names it in errors (`origin:line`).
///
/// # Errors
/// As [`run_file`].
pub fn run_text(origin: &str, text: &str) -> Result<(String, usize), String> {
    let sc: Scenario = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(0);
        format!("{origin}:{line}: {}", e.message())
    })?;
    let w = World::new(sc.frames.unwrap_or(4096).clamp(2, 1 << 20));
    for sp in &sc.step {
        let line = line_of(text, sp.span().start);
        step(&w, sp.get_ref())
            .map_err(|e| format!("{origin}:{line}: step {:?}: {e}", sp.get_ref().op))?;
    }
    // Threads not joined explicitly are joined at the end.
    step(
        &w,
        &Step {
            op: "join".into(),
            ..Step::default()
        },
    )
    .map_err(|e| format!("{origin}: {e}"))?;
    if w.phys.oracle().violation_count() > 0 {
        let v = w.phys.oracle().violations();
        return Err(format!(
            "{origin}: {} coherence violation(s); first:\n{}",
            w.phys.oracle().violation_count(),
            v.first().map(|v| v.to_string()).unwrap_or_default()
        ));
    }
    Ok((sc.description.unwrap_or_default(), sc.step.len()))
}
