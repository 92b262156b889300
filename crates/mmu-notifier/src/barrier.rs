//! Asymmetric memory barriers for the SRCU read side.
//!
//! A grace period is a store-buffering (Dekker) handshake: a reader stores "I am
//! reading" and then loads the list; the writer stores the new list and then
//! loads every reader's state. Both sides need a full (StoreLoad) fence between
//! their store and their load. Readers are hot and writers are rare, so we use
//! the liburcu "memb" flavour: the reader's fence ([`light`]) is only a compiler
//! fence, and the writer's fence ([`heavy`]) is `membarrier(2)` with
//! `MEMBARRIER_CMD_PRIVATE_EXPEDITED`, which makes the kernel run a full barrier
//! on every CPU currently running a thread of this process. That promotes every
//! reader's compiler fence to a real one at the moment it matters.
//!
//! Where membarrier is unavailable (not Linux, an old kernel, seccomp), both
//! sides fall back to `fence(SeqCst)`: correct, but readers pay for a real
//! fence. Under loom and shuttle both are `fence(SeqCst)`, which is the
//! symmetric equivalent the model checkers understand.

use crate::sync::{fence, Ordering};

/// Which fence pair this process uses, decided once when the SRCU domain is
/// created and never changed while readers exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(any(loom, shuttle), allow(dead_code))]
pub(crate) enum Flavour {
    /// Reader: compiler fence; writer: `membarrier(PRIVATE_EXPEDITED)`.
    Membarrier,
    /// Reader and writer: `fence(SeqCst)`.
    Fence,
}

impl Flavour {
    /// Registers this process for expedited private membarriers if the kernel
    /// offers them, otherwise picks the symmetric fallback.
    pub(crate) fn detect() -> Flavour {
        #[cfg(all(target_os = "linux", not(any(loom, shuttle))))]
        {
            use rustix::thread::{membarrier, membarrier_query, MembarrierCommand};
            if std::env::var_os("MMU_NOTIFIER_NO_MEMBARRIER").is_some() {
                return Flavour::Fence;
            }
            let q = membarrier_query();
            if q.contains_command(MembarrierCommand::PrivateExpedited)
                && membarrier(MembarrierCommand::RegisterPrivateExpedited).is_ok()
                && membarrier(MembarrierCommand::PrivateExpedited).is_ok()
            {
                return Flavour::Membarrier;
            }
        }
        Flavour::Fence
    }

    /// The reader's side of the handshake.
    #[inline(always)]
    pub(crate) fn light(self) {
        match self {
            #[cfg(not(any(loom, shuttle)))]
            Flavour::Membarrier => std::sync::atomic::compiler_fence(Ordering::SeqCst),
            _ => fence(Ordering::SeqCst),
        }
    }

    /// The writer's side of the handshake: orders this thread's earlier stores
    /// before its later loads on *every* thread of the process.
    pub(crate) fn heavy(self) {
        match self {
            #[cfg(all(target_os = "linux", not(any(loom, shuttle))))]
            Flavour::Membarrier => {
                use rustix::thread::{membarrier, MembarrierCommand};
                // Registered in `detect`; the command cannot fail afterwards.
                // Should it ever, the fence below keeps us correct only if
                // readers used real fences, so treat failure as fatal.
                membarrier(MembarrierCommand::PrivateExpedited)
                    .expect("membarrier(PRIVATE_EXPEDITED) failed after registration");
                fence(Ordering::SeqCst);
            }
            _ => fence(Ordering::SeqCst),
        }
    }
}
