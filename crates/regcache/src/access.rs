//! [`Access`]: what a registration allows the device to do.

bitflags::bitflags! {
    /// The access a registration grants, as a flag set (the `ibv_access_flags`
    /// of RDMA, the direction of a DMA map). A cached registration satisfies
    /// a lookup when its flags are a superset of the requested ones.
    ///
    /// ```
    /// use regcache::Access;
    /// let rw = Access::READ | Access::WRITE;
    /// assert!(rw.contains(Access::WRITE));
    /// assert!(!Access::READ.contains(rw));
    /// ```
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Access: u32 {
        /// The device reads the memory (a send, a write to a file).
        const READ = 1 << 0;
        /// The device writes the memory (a receive, a read from a file).
        const WRITE = 1 << 1;
        /// A remote peer reads it (RDMA read target).
        const REMOTE_READ = 1 << 2;
        /// A remote peer writes it (RDMA write target).
        const REMOTE_WRITE = 1 << 3;
        /// A remote peer performs atomics on it.
        const ATOMIC = 1 << 4;
    }
}

impl Access {
    /// Read and write: what a buffer used in both directions needs.
    pub const READ_WRITE: Access = Access::READ.union(Access::WRITE);

    /// Whether the device may modify the memory through this access (so the
    /// pages must be registered writable).
    pub fn writes(self) -> bool {
        self.intersects(Access::WRITE | Access::REMOTE_WRITE | Access::ATOMIC)
    }
}
