//! Invalidation ranges and their events (Linux `struct mmu_notifier_range`).

use core::fmt;

/// Page size of every address space this crate models (4 KiB).
pub const PAGE_SIZE: u64 = 4096;

/// End address meaning "to the end of the address space" (Linux `ULONG_MAX`,
/// used by exit and by soft-dirty clearing for `[0, ULONG_MAX)`).
pub const END_OF_ADDRESS_SPACE: u64 = u64::MAX;

/// Why an invalidation happens (Linux `enum mmu_notifier_event`, values 0..7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Event {
    /// The range is being unmapped: munmap, the source of an mremap move, exit.
    Unmap = 0,
    /// Page-table entries are cleared for another reason: madvise, COW, KSM,
    /// migration, reclaim, THP split or collapse.
    Clear = 1,
    /// Protection of the whole range changes according to the VMA (mprotect);
    /// the consumer may apply the VMA protection without reading PTEs.
    ProtectionVma = 2,
    /// Protection of individual pages changes (fork write-protect, writeback);
    /// the consumer must read the CPU page table from the end callback.
    ProtectionPage = 3,
    /// Soft-dirty tracking: same pages, same access; mark soft-dirty at end.
    SoftDirty = 4,
    /// Interval subscribers only, at address-space teardown.
    Release = 5,
    /// Device migration; `owner` is the migrating device's pgmap owner.
    Migrate = 6,
    /// A device is losing exclusive access; `owner` is the caller's owner when
    /// an exclusive entry is created, `None` when the CPU revokes it.
    Exclusive = 7,
}

impl Event {
    /// Every event, in numeric order.
    pub const ALL: [Event; 8] = [
        Event::Unmap,
        Event::Clear,
        Event::ProtectionVma,
        Event::ProtectionPage,
        Event::SoftDirty,
        Event::Release,
        Event::Migrate,
        Event::Exclusive,
    ];

    /// Whether ranges of this event carry an [`Owner`].
    pub fn has_owner(self) -> bool {
        matches!(self, Event::Migrate | Event::Exclusive)
    }
}

/// Opaque identity of a device (Linux `pgmap_owner` / the `owner` pointer),
/// meaningful only for [`Event::Migrate`] and [`Event::Exclusive`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Owner(pub u64);

/// Why a [`Range`] could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// `start >= end`.
    #[error("empty or inverted range [{start:#x}, {end:#x})")]
    Empty {
        /// Requested start.
        start: u64,
        /// Requested end.
        end: u64,
    },
    /// An address is not page aligned (the end may also be
    /// [`END_OF_ADDRESS_SPACE`]).
    #[error("range [{start:#x}, {end:#x}) is not page aligned")]
    Unaligned {
        /// Requested start.
        start: u64,
        /// Requested end.
        end: u64,
    },
    /// `start + length` overflows the address space.
    #[error("range starting at {start:#x} with length {length:#x} overflows")]
    Overflow {
        /// Requested start.
        start: u64,
        /// Requested length.
        length: u64,
    },
    /// An owner was given for an event that has none.
    #[error("event {0:?} carries no owner (only Migrate and Exclusive do)")]
    OwnerNotAllowed(Event),
}

/// `[start, end)` virtual-address range being invalidated, with its event.
///
/// Built only through validating constructors; the `BLOCKABLE` flag is set by
/// the start hook that runs it (the blockable or the non-blockable one), as in
/// Linux, and read by callbacks through [`Range::blockable`].
///
/// ```
/// use mmu_notifier::{Event, Range, RangeError};
/// let r = Range::new(0x1000, 0x3000, Event::Unmap).unwrap();
/// assert_eq!(r.len(), 0x2000);
/// assert!(matches!(Range::new(0x1001, 0x3000, Event::Unmap), Err(RangeError::Unaligned { .. })));
/// assert!(Range::from_len(u64::MAX - 0xfff, 0x2000, Event::Clear).is_err());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Range {
    start: u64,
    end: u64,
    /// The event (low byte), [`BLOCKABLE`] and [`HAS_OWNER`], in one word:
    /// every field of a range is a whole word, so a range written field by
    /// field and then moved (every hook moves it into its
    /// `ActiveInvalidation`) is copied without store-forwarding stalls (a
    /// word loaded right after a byte of it was stored stalls the load for a
    /// dozen cycles), and the range is four words.
    bits: u64,
    /// The owner's value when [`HAS_OWNER`] is set, else 0.
    owner: u64,
}

/// The blockable flag in [`Range::bits`].
const BLOCKABLE: u64 = 1 << 8;
/// The range carries an owner.
const HAS_OWNER: u64 = 1 << 9;

/// The bits of a blockable range of `event`.
const fn bits(event: Event) -> u64 {
    event as u64 | BLOCKABLE
}

impl Range {
    /// A range for an event without owner.
    ///
    /// # Errors
    /// [`RangeError`] if `start >= end`, or either end is unaligned (`end` may
    /// be [`END_OF_ADDRESS_SPACE`]).
    pub fn new(start: u64, end: u64, event: Event) -> Result<Range, RangeError> {
        if start >= end {
            return Err(RangeError::Empty { start, end });
        }
        if start % PAGE_SIZE != 0 || (end % PAGE_SIZE != 0 && end != END_OF_ADDRESS_SPACE) {
            return Err(RangeError::Unaligned { start, end });
        }
        Ok(Range {
            start,
            end,
            bits: bits(event),
            owner: 0,
        })
    }

    /// A range of `length` bytes from `start`.
    ///
    /// # Errors
    /// [`RangeError::Overflow`] when `start + length` does not fit, plus the
    /// errors of [`Range::new`].
    pub fn from_len(start: u64, length: u64, event: Event) -> Result<Range, RangeError> {
        let end = start
            .checked_add(length)
            .ok_or(RangeError::Overflow { start, length })?;
        Range::new(start, end, event)
    }

    /// The whole address space, `[0, END_OF_ADDRESS_SPACE)`.
    pub fn everything(event: Event) -> Range {
        Range {
            start: 0,
            end: END_OF_ADDRESS_SPACE,
            bits: bits(event),
            owner: 0,
        }
    }

    /// A range carrying an owner (Linux `mmu_notifier_range_init_owner`).
    ///
    /// # Errors
    /// [`RangeError::OwnerNotAllowed`] unless `event` is `Migrate` or
    /// `Exclusive`, plus the errors of [`Range::new`].
    pub fn with_owner(
        start: u64,
        end: u64,
        event: Event,
        owner: Option<Owner>,
    ) -> Result<Range, RangeError> {
        if owner.is_some() && !event.has_owner() {
            return Err(RangeError::OwnerNotAllowed(event));
        }
        let mut r = Range::new(start, end, event)?;
        if let Some(Owner(o)) = owner {
            r.bits |= HAS_OWNER;
            r.owner = o;
        }
        Ok(r)
    }

    /// Inclusive start address.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Exclusive end address.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Inclusive last address, `end - 1` (what interval queries use).
    pub fn last(&self) -> u64 {
        self.end - 1
    }

    /// Length in bytes.
    #[allow(clippy::len_without_is_empty)] // a Range is never empty
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Why the invalidation happens.
    pub fn event(&self) -> Event {
        Event::ALL[(self.bits & 0xff) as usize & 7]
    }

    /// The device owner, for `Migrate` and `Exclusive` only.
    pub fn owner(&self) -> Option<Owner> {
        (self.bits & HAS_OWNER != 0).then_some(Owner(self.owner))
    }

    /// Whether callbacks may sleep (Linux `mmu_notifier_range_blockable`).
    /// Set by the start hook: true for `invalidate_range_start`, false for
    /// `invalidate_range_start_nonblock`.
    pub fn blockable(&self) -> bool {
        self.bits & BLOCKABLE != 0
    }

    /// Whether `[start, end)` overlaps the inclusive interval `[first, last]`.
    pub fn overlaps(&self, first: u64, last: u64) -> bool {
        self.start <= last && first <= self.last()
    }

    /// This range with the blockable flag set to `blockable` (a new value,
    /// so the flag is written with the rest of the range).
    #[inline(always)]
    pub(crate) fn blockable_as(self, blockable: bool) -> Range {
        Range {
            bits: (self.bits & !BLOCKABLE) | if blockable { BLOCKABLE } else { 0 },
            ..self
        }
    }
}

impl fmt::Debug for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Range[{:#x}, {:#x}) {:?}{}",
            self.start,
            self.end,
            self.event(),
            if self.blockable() { "" } else { " nonblock" }
        )?;
        if let Some(o) = self.owner() {
            write!(f, " owner={:#x}", o.0)?;
        }
        Ok(())
    }
}
