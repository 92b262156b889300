//! An interval tree: dynamic insert and remove of possibly overlapping and
//! duplicate closed intervals `[start, last]`, and overlap queries in
//! `O(log n + k)` expected time (Linux's augmented red-black
//! `interval_tree`).
//!
//! The tree is a treap (a binary search tree on the key, a heap on random
//! priorities, so expected depth `O(log n)`) kept in an arena of nodes
//! addressed by index. Each node is augmented with the largest `last` of its
//! subtree, which lets a query skip every subtree that ends before the query
//! starts. The key is `(start, insertion number)`, so equal starts are visited
//! in insertion order, as in Linux, and duplicates never collide.
//!
//! Crates such as `iset` or `intervaltree` do not fit: the former keys entries
//! by their range (an identical range replaces the entry), the latter is
//! static. Every insert returns a [`NodeId`] that identifies that one entry
//! for its removal.
//!
//! ```ignore
//! let mut t = ITree::new();
//! let a = t.insert(0x1000, 0x1fff, "a");
//! t.insert(0x1800, 0x2fff, "b");
//! let mut hit = vec![];
//! t.for_each_overlap(0x1f00, 0x1f00, |v| { hit.push(*v); true });
//! assert_eq!(hit, ["a", "b"]);
//! assert_eq!(t.remove(a), "a");
//! ```

use alloc::vec::Vec;

/// Identifies one inserted entry until it is removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct NodeId(u32);

const NIL: u32 = u32::MAX;

struct Node<V> {
    start: u64,
    last: u64,
    /// Insertion number: the second half of the key.
    order: u64,
    prio: u32,
    left: u32,
    right: u32,
    /// Largest `last` in this subtree.
    max_last: u64,
    value: Option<V>,
}

/// The tree. `V` is the value stored per interval.
pub(crate) struct ITree<V> {
    nodes: Vec<Node<V>>,
    free: Vec<u32>,
    root: u32,
    len: usize,
    next_order: u64,
    /// xorshift state for priorities (deterministic, no global RNG needed).
    rng: u64,
}

impl<V> Default for ITree<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V> ITree<V> {
    /// An empty tree.
    pub(crate) fn new() -> Self {
        ITree {
            nodes: Vec::new(),
            free: Vec::new(),
            root: NIL,
            len: 0,
            next_order: 0,
            rng: 0x9e37_79b9_7f4a_7c15,
        }
    }

    /// Number of intervals.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    fn next_prio(&mut self) -> u32 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        (x >> 32) as u32
    }

    #[inline]
    fn key(&self, i: u32) -> (u64, u64) {
        let n = &self.nodes[i as usize];
        (n.start, n.order)
    }

    #[inline]
    fn max_of(&self, i: u32) -> u64 {
        if i == NIL {
            0
        } else {
            self.nodes[i as usize].max_last
        }
    }

    fn update(&mut self, i: u32) {
        let (l, r) = {
            let n = &self.nodes[i as usize];
            (n.left, n.right)
        };
        let m = self.nodes[i as usize]
            .last
            .max(self.max_of(l))
            .max(self.max_of(r));
        self.nodes[i as usize].max_last = m;
    }

    /// Splits subtree `t` into keys `< key` and keys `>= key`.
    fn split(&mut self, t: u32, key: (u64, u64)) -> (u32, u32) {
        if t == NIL {
            return (NIL, NIL);
        }
        if self.key(t) < key {
            let r = self.nodes[t as usize].right;
            let (a, b) = self.split(r, key);
            self.nodes[t as usize].right = a;
            self.update(t);
            (t, b)
        } else {
            let l = self.nodes[t as usize].left;
            let (a, b) = self.split(l, key);
            self.nodes[t as usize].left = b;
            self.update(t);
            (a, t)
        }
    }

    /// Joins two subtrees where every key of `a` is below every key of `b`.
    fn merge(&mut self, a: u32, b: u32) -> u32 {
        if a == NIL {
            return b;
        }
        if b == NIL {
            return a;
        }
        if self.nodes[a as usize].prio > self.nodes[b as usize].prio {
            let r = self.nodes[a as usize].right;
            let m = self.merge(r, b);
            self.nodes[a as usize].right = m;
            self.update(a);
            a
        } else {
            let l = self.nodes[b as usize].left;
            let m = self.merge(a, l);
            self.nodes[b as usize].left = m;
            self.update(b);
            b
        }
    }

    /// Inserts `[start, last]` (`start <= last`) with `value`.
    pub(crate) fn insert(&mut self, start: u64, last: u64, value: V) -> NodeId {
        debug_assert!(start <= last);
        let order = self.next_order;
        self.next_order += 1;
        let prio = self.next_prio();
        let node = Node {
            start,
            last,
            order,
            prio,
            left: NIL,
            right: NIL,
            max_last: last,
            value: Some(value),
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                assert!(self.nodes.len() < NIL as usize, "interval tree is full");
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        };
        self.root = self.insert_at(self.root, i);
        self.len += 1;
        NodeId(i)
    }

    fn insert_at(&mut self, t: u32, i: u32) -> u32 {
        if t == NIL {
            return i;
        }
        if self.nodes[i as usize].prio > self.nodes[t as usize].prio {
            let (a, b) = self.split(t, self.key(i));
            self.nodes[i as usize].left = a;
            self.nodes[i as usize].right = b;
            self.update(i);
            return i;
        }
        if self.key(i) < self.key(t) {
            let l = self.nodes[t as usize].left;
            let n = self.insert_at(l, i);
            self.nodes[t as usize].left = n;
        } else {
            let r = self.nodes[t as usize].right;
            let n = self.insert_at(r, i);
            self.nodes[t as usize].right = n;
        }
        self.update(t);
        t
    }

    /// Removes the entry `id` and returns its value.
    ///
    /// # Panics
    /// If `id` is not in the tree (a logic error in the caller).
    pub(crate) fn remove(&mut self, id: NodeId) -> V {
        let i = id.0;
        let value = self.nodes[i as usize]
            .value
            .take()
            .expect("interval tree: remove of an entry that is not in the tree");
        let key = self.key(i);
        self.root = self.remove_at(self.root, key, i);
        self.free.push(i);
        self.len -= 1;
        value
    }

    fn remove_at(&mut self, t: u32, key: (u64, u64), i: u32) -> u32 {
        assert!(t != NIL, "interval tree: entry not reachable by its key");
        if t == i {
            let (l, r) = {
                let n = &self.nodes[t as usize];
                (n.left, n.right)
            };
            return self.merge(l, r);
        }
        if key < self.key(t) {
            let l = self.nodes[t as usize].left;
            let n = self.remove_at(l, key, i);
            self.nodes[t as usize].left = n;
        } else {
            let r = self.nodes[t as usize].right;
            let n = self.remove_at(r, key, i);
            self.nodes[t as usize].right = n;
        }
        self.update(t);
        t
    }

    /// Whether any interval overlaps `[start, last]`.
    pub(crate) fn overlaps(&self, start: u64, last: u64) -> bool {
        let mut found = false;
        self.for_each_overlap(start, last, |_| {
            found = true;
            false
        });
        found
    }

    /// Calls `f` on every value whose interval overlaps `[start, last]`, in
    /// ascending `(start, insertion)` order, until `f` returns false.
    /// Returns false if `f` stopped the walk.
    pub(crate) fn for_each_overlap(
        &self,
        start: u64,
        last: u64,
        mut f: impl FnMut(&V) -> bool,
    ) -> bool {
        self.walk(self.root, start, last, &mut f)
    }

    fn walk(&self, t: u32, start: u64, last: u64, f: &mut impl FnMut(&V) -> bool) -> bool {
        if t == NIL {
            return true;
        }
        let n = &self.nodes[t as usize];
        // Nothing in this subtree ends at or after `start`.
        if n.max_last < start {
            return true;
        }
        if !self.walk(n.left, start, last, f) {
            return false;
        }
        // This node and everything to its right start after `last`.
        if n.start > last {
            return true;
        }
        if n.last >= start {
            if let Some(v) = &n.value {
                if !f(v) {
                    return false;
                }
            }
        }
        self.walk(n.right, start, last, f)
    }

    /// Depth of the deepest node (0 for an empty tree), checking on the way
    /// that every node's priority is at least its children's (the heap half
    /// of the treap, which is what keeps the depth logarithmic).
    #[cfg(test)]
    fn depth_checking_heap(&self, t: u32) -> usize {
        if t == NIL {
            return 0;
        }
        let n = &self.nodes[t as usize];
        for c in [n.left, n.right] {
            if c != NIL {
                assert!(
                    self.nodes[c as usize].prio <= n.prio,
                    "heap order broken below node {t}"
                );
            }
        }
        1 + self
            .depth_checking_heap(n.left)
            .max(self.depth_checking_heap(n.right))
    }

    /// Every value, in key order.
    #[cfg(test)]
    pub(crate) fn values(&self) -> Vec<V>
    where
        V: Clone,
    {
        let mut out = Vec::new();
        self.for_each_overlap(0, u64::MAX, |v| {
            out.push(v.clone());
            true
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn equal_starts_in_insertion_order_and_duplicates_kept() {
        let mut t = ITree::new();
        let a = t.insert(10, 20, 'a');
        t.insert(10, 20, 'b');
        t.insert(5, 30, 'c');
        t.insert(10, 12, 'd');
        let mut got = vec![];
        t.for_each_overlap(15, 15, |v| {
            got.push(*v);
            true
        });
        assert_eq!(got, ['c', 'a', 'b']);
        assert_eq!(t.remove(a), 'a');
        assert_eq!(t.len(), 3);
        assert!(t.overlaps(11, 11));
        assert!(!t.overlaps(31, 100));
        assert_eq!(t.values(), ['c', 'b', 'd']);
    }

    /// Registration caches insert intervals in address order and evict in
    /// LRU order: the treap must stay shallow for both (a tree that
    /// degenerates into a list makes every invalidation linear).
    #[test]
    fn stays_logarithmic_under_sorted_inserts_and_churn() {
        const N: u64 = 4096;
        let mut t = ITree::new();
        let mut ids: Vec<NodeId> = (0..N).map(|i| t.insert(i * 8, i * 8 + 7, i)).collect();
        // Expected depth of a treap is about 3 ln N (25 here); the
        // priorities are deterministic, so this bound is not a flaky one.
        let depth = t.depth_checking_heap(t.root);
        assert!(depth <= 48, "depth {depth} for {N} sorted inserts");
        // Remove every other entry oldest first (merges), then insert again.
        for id in ids.iter().step_by(2) {
            t.remove(*id);
        }
        ids.clear();
        for i in 0..N / 2 {
            ids.push(t.insert(N * 8 + i, N * 8 + i, i));
        }
        let depth = t.depth_checking_heap(t.root);
        assert!(depth <= 48, "depth {depth} after churn");
        assert_eq!(t.len(), N as usize);
        // Priorities are not a constant (that would make every tree a list
        // whatever the comparisons do).
        let first = t.next_prio();
        assert!((0..8).any(|_| t.next_prio() != first));
    }

    #[test]
    fn full_range_bounds() {
        let mut t = ITree::new();
        t.insert(u64::MAX - 1, u64::MAX, 1);
        t.insert(0, 0, 2);
        assert!(t.overlaps(0, u64::MAX));
        assert!(t.overlaps(u64::MAX, u64::MAX));
        assert!(!t.overlaps(1, u64::MAX - 2));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u64),
        Remove(usize),
        Query(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..200, 0u64..40).prop_map(|(s, l)| Op::Insert(s, s + l)),
            any::<usize>().prop_map(Op::Remove),
            (0u64..250, 0u64..60).prop_map(|(s, l)| Op::Query(s, s + l)),
        ]
    }

    proptest! {
        /// Random insert/remove/query sequences against a Vec scan.
        #[test]
        fn matches_a_vec_scan(ops in proptest::collection::vec(op(), 1..300)) {
            let mut tree = ITree::new();
            // (start, last, order, id, value)
            let mut model: Vec<(u64, u64, u64, NodeId, u32)> = Vec::new();
            let mut order = 0u64;
            for (n, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Insert(s, l) => {
                        let id = tree.insert(s, l, n as u32);
                        model.push((s, l, order, id, n as u32));
                        order += 1;
                    }
                    Op::Remove(i) => {
                        if !model.is_empty() {
                            let (_, _, _, id, v) = model.remove(i % model.len());
                            prop_assert_eq!(tree.remove(id), v);
                        }
                    }
                    Op::Query(s, l) => {
                        let mut want: Vec<_> = model
                            .iter()
                            .filter(|e| e.0 <= l && e.1 >= s)
                            .map(|e| (e.0, e.2, e.4))
                            .collect();
                        want.sort();
                        let want: Vec<u32> = want.into_iter().map(|w| w.2).collect();
                        let mut got = vec![];
                        tree.for_each_overlap(s, l, |v| { got.push(*v); true });
                        prop_assert_eq!(&got, &want);
                        prop_assert_eq!(tree.overlaps(s, l), !want.is_empty());
                    }
                }
                prop_assert_eq!(tree.len(), model.len());
            }
        }
    }
}
