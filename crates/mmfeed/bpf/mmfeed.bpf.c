// SPDX-License-Identifier: GPL-2.0 OR MIT
//
// The start/end feed of a process's own address-space changes.
//
// One program set serves every process on the host. Each program runs at
// the entry or the exit of a system call that can take memory away from a
// process (munmap, mremap, mmap MAP_FIXED, madvise, brk, shmdt, shmat
// SHM_REMAP, io_destroy, process_madvise, and io_uring's IORING_OP_MADVISE),
// looks the calling process (tgid) up in `feeds` and, only when the
// process asked for a feed, publishes a record into that process's own
// feed: a one-element BPF_F_MMAPABLE array the process maps read-only.
//
// Each call is handled once (on_<call>), from either attach point: the
// syscalls:* tracepoints (one program per call's entry and exit), or, where
// a kernel lacks them, the BTF raw tracepoints sys_enter / sys_exit (one
// program each, picking the calls by number). The loader uses one set.
//
// * START is published at syscall *entry*, before the kernel takes the mmap
//   lock, so it is ordered before any other thread can be handed the
//   addresses the call frees (record -> mmap_lock release by this call ->
//   mmap_lock acquire by the other thread's mmap -> its lookup's acquire
//   load of `head`): what Linux's invalidate_range_start gives a secondary.
// * END is published at syscall *exit* of a call that published a START
//   (the `pending` map remembers which threads did): what
//   invalidate_range_end gives. Between the two the range is in flight, and
//   a registration must neither start nor commit over it.
// * io_uring's MADVISE runs on an io-wq worker, not in a system call: its
//   START is published when the request is queued for the worker (after any
//   link it waits on), its END when its completion is posted; the two are
//   paired by the request, under an owner token taken from the feed's
//   `tokens` counter instead of a thread id.
//
// Records are claimed with an atomic add on `head` and published with a
// per-slot sequence written last (0 while the slot is being written), so a
// reader can tell a complete record from a torn or overwritten one.
//
// Rebuild (clang and libbpf-dev from Debian): scripts/build-bpf.sh

#include <linux/bpf.h>
#include <linux/types.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

#define FEED_SLOTS 1024 /* a power of two */
#define PAGE_MASK_ (~4095ULL)
#define ALL_END (~0ULL)

#define KIND_START 1
#define KIND_END 2
/* A START whose END the kernel will not report (an io_uring MADVISE with
 * IOSQE_CQE_SKIP_SUCCESS posts no completion when it succeeds). */
#define KIND_UNPAIRED 3

/* Owner tokens of io_uring requests: above every thread id (pid_max is at
 * most 2^22). */
#define TOKEN_BIT 0x80000000u

/* mmu_notifier events (Linux enum mmu_notifier_event) */
#define EV_UNMAP 0
#define EV_CLEAR 1

struct record {
	__u64 start;
	__u64 end;
	/* the thread that made the call, or an io_uring request's token */
	__u32 tid;
	/* KIND_* in the low byte, for a START the mmu_notifier event above it */
	__u32 kind;
	/* index + 1 of the record the slot holds, 0 while it is written */
	__u64 seq;
};

struct feed {
	/* records claimed so far; record i lives in slot i % FEED_SLOTS */
	__u64 head;
	/* syscalls that published a START and have not yet reached their exit */
	__u64 inflight;
	/* owner tokens handed to io_uring requests so far */
	__u64 tokens;
	__u64 reserved[5];
	struct record slots[FEED_SLOTS];
};

/* Sizes rather than types: clang emits `struct feed` here as a forward
 * declaration, which aya's BTF parser rejects. */
struct feed_map {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(struct feed));
};

/* tgid -> that process's feed */
struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__array(values, struct feed_map);
} feeds SEC(".maps");

/* thread id -> 1 while its syscall published a START and has not exited */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u32);
} pending SEC(".maps");

/* An io_uring request with a START and no END yet. */
struct pending_owner {
	/* the START's owner token */
	__u32 token;
	/* the process whose feed has it */
	__u32 tgid;
};

/* io_uring request (its address) -> its START's owner, while the request
 * is queued or running */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct pending_owner);
} pending_req SEC(".maps");

/* The layout of every syscalls:sys_enter_* / sys_exit_* tracepoint. */
struct sys_enter_args {
	__u64 common;
	__s32 nr;
	__u32 pad;
	__u64 args[6];
};

struct sys_exit_args {
	__u64 common;
	__s32 nr;
	__u32 pad;
	__s64 ret;
};

/* Only the fields brk needs, relocated against the running kernel's BTF. */
struct mm_struct {
	unsigned long start_brk;
	unsigned long brk;
} __attribute__((preserve_access_index));

struct task_struct {
	struct mm_struct *mm;
} __attribute__((preserve_access_index));

static __always_inline struct feed *my_feed(void)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	void *inner = bpf_map_lookup_elem(&feeds, &tgid);
	__u32 zero = 0;

	if (!inner)
		return 0;
	return bpf_map_lookup_elem(inner, &zero);
}

static __always_inline void publish_as(struct feed *f, __u32 owner, __u64 start, __u64 end,
				       __u32 kind)
{
	__u64 idx = __sync_fetch_and_add(&f->head, 1);
	struct record *r = &f->slots[idx & (FEED_SLOTS - 1)];

	__sync_lock_test_and_set(&r->seq, 0);
	r->start = start;
	r->end = end;
	r->tid = owner;
	r->kind = kind;
	__sync_lock_test_and_set(&r->seq, idx + 1);
}

static __always_inline void publish(struct feed *f, __u64 start, __u64 end, __u32 kind)
{
	publish_as(f, (__u32)bpf_get_current_pid_tgid(), start, end, kind);
}

/* The END of `owner`'s STARTs: its call returned or its request completed. */
static __always_inline void publish_end(struct feed *f, __u32 owner)
{
	publish_as(f, owner, 0, 0, KIND_END);
	__sync_fetch_and_add(&f->inflight, -1);
}

/* No room to remember `owner` (the map of pending calls or requests is
 * full): flush everything and end it at once, counted in and out of
 * `inflight`; the range is then not held in flight. */
static __always_inline void flush_unheld(struct feed *f, __u32 owner, __u32 event)
{
	publish_as(f, owner, 0, ALL_END, KIND_START | (event << 8));
	publish_end(f, owner);
}

/* [start, end) rounded outwards to pages; false when empty. */
static __always_inline int page_range(__u64 *start, __u64 *end)
{
	if (*end <= *start)
		return 0;
	*start &= PAGE_MASK_;
	*end = *end > ALL_END - 4095 ? ALL_END : (*end + 4095) & PAGE_MASK_;
	return 1;
}

/* A START for [start, end), page-aligned outwards; once per syscall the
 * thread is marked pending so its exit publishes the END. */
static __always_inline void start(struct feed *f, __u64 start, __u64 end, __u32 event)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u32 one = 1;

	if (!page_range(&start, &end))
		return;
	if (!bpf_map_lookup_elem(&pending, &tid)) {
		__sync_fetch_and_add(&f->inflight, 1);
		if (bpf_map_update_elem(&pending, &tid, &one, BPF_ANY)) {
			/* 65536 threads host-wide inside these calls at once. */
			flush_unheld(f, tid, event);
			return;
		}
	}
	publish(f, start, end, KIND_START | (event << 8));
}

static __always_inline int end_of_call(void)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct feed *f;

	if (!bpf_map_lookup_elem(&pending, &tid))
		return 0;
	bpf_map_delete_elem(&pending, &tid);
	f = my_feed();
	if (!f)
		return 0;
	publish_end(f, tid);
	return 0;
}

static __always_inline __u64 add_len(__u64 addr, __u64 len)
{
	return addr + len < addr ? ALL_END : addr + len;
}

/* A START for [addr, addr + len) in this process's feed, if it has one. */
static __always_inline int start_mine(__u64 addr, __u64 len, __u32 event)
{
	struct feed *f = my_feed();

	if (f)
		start(f, addr, add_len(addr, len), event);
	return 0;
}

/* A START of everything: calls whose ranges the feed does not decode. */
static __always_inline int flush_all(__u32 event)
{
	return start_mine(0, ALL_END, event);
}

static __always_inline int on_munmap(const __u64 *args)
{
	return start_mine(args[0], args[1], EV_UNMAP);
}

#define MREMAP_MAYMOVE 1
#define MREMAP_FIXED 2

static __always_inline int on_mremap(const __u64 *args)
{
	__u64 addr = args[0], old_len = args[1], new_len = args[2];
	__u64 flags = args[3], new_addr = args[4];
	struct feed *f = my_feed();

	if (!f)
		return 0;
	if (flags & MREMAP_FIXED) {
		/* Moved away, and whatever was mapped at the target replaced. */
		start(f, addr, add_len(addr, old_len), EV_UNMAP);
		start(f, new_addr, add_len(new_addr, new_len), EV_UNMAP);
	} else if (new_len < old_len) {
		/* Shrunk in place: the tail goes. */
		start(f, addr + new_len, add_len(addr, old_len), EV_UNMAP);
	} else if (flags & MREMAP_MAYMOVE) {
		/* Grown, and it may move. */
		start(f, addr, add_len(addr, old_len), EV_UNMAP);
	}
	return 0;
}

#define MAP_FIXED 0x10

static __always_inline int on_mmap(const __u64 *args)
{
	/* MAP_FIXED replaces what was mapped; MAP_FIXED_NOREPLACE does not. */
	if (!(args[3] & MAP_FIXED))
		return 0;
	return start_mine(args[0], args[1], EV_UNMAP);
}

#define MADV_DONTNEED 4
#define MADV_FREE 8
#define MADV_REMOVE 9
#define MADV_DONTNEED_LOCKED 24
#define MADV_GUARD_INSTALL 102

/* The advice values that take pages away. */
static __always_inline int drops_pages(__u64 advice)
{
	return advice == MADV_DONTNEED || advice == MADV_FREE || advice == MADV_REMOVE ||
	       advice == MADV_DONTNEED_LOCKED || advice == MADV_GUARD_INSTALL;
}

static __always_inline int on_madvise(const __u64 *args)
{
	if (!drops_pages(args[2]))
		return 0;
	return start_mine(args[0], args[1], EV_CLEAR);
}

static __always_inline int on_brk(const __u64 *args)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	__u64 want = args[0], brk, start_brk;
	struct feed *f = my_feed();

	if (!f || !want)
		return 0;
	brk = BPF_CORE_READ(task, mm, brk);
	start_brk = BPF_CORE_READ(task, mm, start_brk);
	/* A shrink frees the pages above the new break (rounded up, as the
	 * kernel rounds it); below start_brk it fails. */
	if (want < brk && want >= start_brk)
		start(f, (want + 4095) & PAGE_MASK_, brk, EV_UNMAP);
	return 0;
}

/* The calls below change ranges the feed does not decode: everything is
 * flushed. */
static __always_inline int on_shmdt(const __u64 *args)
{
	return flush_all(EV_UNMAP);
}

#define SHM_REMAP 040000

/* shmat with SHM_REMAP replaces whatever was mapped where the segment goes
 * (its size is not an argument). */
static __always_inline int on_shmat(const __u64 *args)
{
	if (!(args[2] & SHM_REMAP))
		return 0;
	return flush_all(EV_UNMAP);
}

/* io_destroy unmaps the AIO context's ring. */
static __always_inline int on_io_destroy(const __u64 *args)
{
	return flush_all(EV_UNMAP);
}

static __always_inline int on_process_madvise(const __u64 *args)
{
	return flush_all(EV_CLEAR);
}

/* The entry and exit of each call above on the syscalls:* tracepoints
 * (the attach point preferred where the kernel has them). */
#define SYSCALL_TRACEPOINTS(name)                                            \
	SEC("tracepoint/syscalls/sys_enter_" #name)                          \
	int enter_##name(struct sys_enter_args *ctx) { return on_##name(ctx->args); } \
	SEC("tracepoint/syscalls/sys_exit_" #name)                           \
	int exit_##name(struct sys_exit_args *ctx) { return end_of_call(); }

SYSCALL_TRACEPOINTS(munmap)
SYSCALL_TRACEPOINTS(mremap)
SYSCALL_TRACEPOINTS(mmap)
SYSCALL_TRACEPOINTS(madvise)
SYSCALL_TRACEPOINTS(brk)
SYSCALL_TRACEPOINTS(shmdt)
SYSCALL_TRACEPOINTS(shmat)
SYSCALL_TRACEPOINTS(io_destroy)
SYSCALL_TRACEPOINTS(process_madvise)

#if defined(__TARGET_ARCH_x86)
/* The same calls from the BTF raw tracepoints raw_syscalls:sys_enter and
 * sys_exit, for kernels without the syscalls:* tracepoints
 * (CONFIG_FTRACE_SYSCALLS off). One program sees every system call and
 * picks the ones above by number (x86-64's; 32-bit compat calls are not
 * covered, as with the tracepoints). */

struct pt_regs {
	unsigned long di;
	unsigned long si;
	unsigned long dx;
	unsigned long r10;
	unsigned long r8;
	unsigned long r9;
	unsigned long orig_ax;
} __attribute__((preserve_access_index));

#define NR_mmap 9
#define NR_munmap 11
#define NR_brk 12
#define NR_mremap 25
#define NR_madvise 28
#define NR_shmat 30
#define NR_shmdt 67
#define NR_io_destroy 207
#define NR_process_madvise 440

static __always_inline int fed_call(long id)
{
	switch (id) {
	case NR_mmap:
	case NR_munmap:
	case NR_brk:
	case NR_mremap:
	case NR_madvise:
	case NR_shmat:
	case NR_shmdt:
	case NR_io_destroy:
	case NR_process_madvise:
		return 1;
	}
	return 0;
}

/* sys_enter(struct pt_regs *regs, long id) */
SEC("tp_btf/sys_enter")
int btf_sys_enter(__u64 *ctx)
{
	struct pt_regs *regs = (struct pt_regs *)ctx[0];
	long id = (long)ctx[1];
	__u64 args[6];

	if (!fed_call(id))
		return 0;
	args[0] = BPF_CORE_READ(regs, di);
	args[1] = BPF_CORE_READ(regs, si);
	args[2] = BPF_CORE_READ(regs, dx);
	args[3] = BPF_CORE_READ(regs, r10);
	args[4] = BPF_CORE_READ(regs, r8);
	args[5] = BPF_CORE_READ(regs, r9);
	switch (id) {
	case NR_mmap:
		return on_mmap(args);
	case NR_munmap:
		return on_munmap(args);
	case NR_brk:
		return on_brk(args);
	case NR_mremap:
		return on_mremap(args);
	case NR_madvise:
		return on_madvise(args);
	case NR_shmat:
		return on_shmat(args);
	case NR_shmdt:
		return on_shmdt(args);
	case NR_io_destroy:
		return on_io_destroy(args);
	case NR_process_madvise:
		return on_process_madvise(args);
	}
	return 0;
}

/* sys_exit(struct pt_regs *regs, long ret) */
SEC("tp_btf/sys_exit")
int btf_sys_exit(__u64 *ctx)
{
	struct pt_regs *regs = (struct pt_regs *)ctx[0];

	if (!fed_call((long)BPF_CORE_READ(regs, orig_ax)))
		return 0;
	return end_of_call();
}
#endif

/* io_uring's MADVISE. */

#define IORING_OP_MADVISE 25
/* REQ_F_CQE_SKIP: the request's IOSQE_CQE_SKIP_SUCCESS flag, same bit */
#define REQ_F_CQE_SKIP (1ULL << 6)

/* io_uring:io_uring_queue_async_work */
struct uring_queue_args {
	__u64 common;
	void *ctx;
	void *req;
	__u64 user_data;
	__u8 opcode;
	__u8 pad[7];
	__u64 flags;
	void *work;
	__s32 rw;
};

/* io_uring:io_uring_complete */
struct uring_complete_args {
	__u64 common;
	void *ctx;
	void *req;
};

/* The request's command, relocated against the running kernel's BTF. It
 * sits at the start of struct io_kiocb (every command begins with the file
 * pointer the request's union shares). */
struct io_madvise {
	__u64 addr;
	__u64 len;
	__u32 advice;
} __attribute__((preserve_access_index));

/* A MADVISE is queued for an io-wq worker, which will run it: START. */
SEC("tracepoint/io_uring/io_uring_queue_async_work")
int uring_queue(struct uring_queue_args *ctx)
{
	struct io_madvise *m = ctx->req;
	__u64 req = (__u64)ctx->req, start_, end_, len;
	struct pending_owner owner;
	__u32 advice, token;
	struct feed *f;

	if (ctx->opcode != IORING_OP_MADVISE)
		return 0;
	f = my_feed();
	if (!f)
		return 0;
	start_ = BPF_CORE_READ(m, addr);
	len = BPF_CORE_READ(m, len);
	advice = BPF_CORE_READ(m, advice);
	if (!drops_pages(advice))
		return 0;
	end_ = add_len(start_, len);
	if (!page_range(&start_, &end_))
		return 0;
	token = TOKEN_BIT | ((__u32)__sync_fetch_and_add(&f->tokens, 1) & ~TOKEN_BIT);
	if (ctx->flags & REQ_F_CQE_SKIP) {
		/* Its success posts no completion: no END will come. */
		publish_as(f, token, start_, end_, KIND_UNPAIRED | (EV_CLEAR << 8));
		return 0;
	}
	owner.token = token;
	owner.tgid = bpf_get_current_pid_tgid() >> 32;
	__sync_fetch_and_add(&f->inflight, 1);
	if (bpf_map_update_elem(&pending_req, &req, &owner, BPF_ANY)) {
		flush_unheld(f, token, EV_CLEAR);
		return 0;
	}
	publish_as(f, token, start_, end_, KIND_START | (EV_CLEAR << 8));
	return 0;
}

/* A completion is posted: the END of a MADVISE that published a START. */
SEC("tracepoint/io_uring/io_uring_complete")
int uring_complete(struct uring_complete_args *ctx)
{
	__u64 req = (__u64)ctx->req;
	struct pending_owner *p = bpf_map_lookup_elem(&pending_req, &req);
	__u32 token;
	struct feed *f;

	if (!p)
		return 0;
	token = p->token;
	/* Only the process that queued it (a request freed unseen, and its
	 * address reused by another process, must not end anything there). */
	if (p->tgid != bpf_get_current_pid_tgid() >> 32)
		return 0;
	bpf_map_delete_elem(&pending_req, &req);
	f = my_feed();
	if (!f)
		return 0;
	publish_end(f, token);
	return 0;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
