//! `Anchored`: a reference kept alive by the `Arc` it points into.

use core::ptr::NonNull;

/// A reference into a value kept alive by an `Arc` that travels with it: the
/// walk reaches a notifier with one load of this pointer, where an
/// `Arc<dyn MmuNotifier>` first loads the alignment from the vtable to find
/// its value (and the hooks' walks make one call per notifier).
pub(crate) struct Anchored<O: ?Sized, T: ?Sized> {
    /// Points into `*owner` (or at a `'static`), see [`Anchored::new`].
    ptr: NonNull<T>,
    /// Never handed out, so no `&mut O` (`Arc::get_mut`) can exist while
    /// `ptr` does.
    owner: alloc::sync::Arc<O>,
}

// SAFETY: an `Anchored` is an `Arc<O>` plus a shared reference derived from
// it; it is `Send`/`Sync` exactly when both parts would be: `Arc<O>` needs
// `O: Send + Sync`, `&T` needs `T: Sync` to be shared or sent.
unsafe impl<O: ?Sized + Send + Sync, T: ?Sized + Sync> Send for Anchored<O, T> {}
// SAFETY: as for `Send`.
unsafe impl<O: ?Sized + Send + Sync, T: ?Sized + Sync> Sync for Anchored<O, T> {}

impl<O, T: ?Sized> Anchored<O, T> {
    /// The reference `project` returns for the owner, kept with the owner.
    pub(crate) fn new(
        owner: alloc::sync::Arc<O>,
        project: impl for<'a> FnOnce(&'a O) -> &'a T,
    ) -> Self {
        let ptr = NonNull::from(project(&owner));
        Anchored { ptr, owner }
    }

    /// The owner.
    pub(crate) fn owner(&self) -> &alloc::sync::Arc<O> {
        &self.owner
    }

    /// The same reference, with the owner's type forgotten (it is only kept
    /// alive): what lets a module hold a part of a value without naming the
    /// whole.
    pub(crate) fn erase_owner(self) -> Anchored<dyn Send + Sync, T>
    where
        O: Send + Sync + 'static,
    {
        // The pointer still points into the same `*owner`, which the
        // unsized `Arc` keeps alive exactly as the sized one did.
        Anchored {
            ptr: self.ptr,
            owner: self.owner,
        }
    }
}

impl<O: ?Sized, T: ?Sized> core::ops::Deref for Anchored<O, T> {
    type Target = T;
    #[inline(always)]
    fn deref(&self) -> &T {
        // SAFETY: `ptr` came from a `&'a T` that `project` derived from a
        // `&'a O` borrow of `*owner` (the signature allows nothing else but a
        // `'static`). Such a reference stays valid while `*owner` is alive and
        // not mutably borrowed: `owner` keeps it alive (its `Arc` is ours, and
        // the `Arc`'s value never moves), and a `&mut O` would need
        // `Arc::get_mut` on our `owner`, which we never expose. Our `&self`
        // borrow bounds the returned reference.
        unsafe { self.ptr.as_ref() }
    }
}
