/*
 * The anchor of the hooks benchmark: Linux v6.6's
 * mmu_notifier_invalidate_range_start/end for an address space with N
 * classic notifiers and no interval notifier, re-created in user space.
 * The mm_has_notifiers test inline in the caller, the out-of-line
 * __mmu_notifier_* functions, one read-side section per walk (liburcu's
 * membarrier flavour stands in for SRCU's read side), an RCU list walk and
 * one indirect call per notifier, start returning int.
 *
 * Protocol: argv[1] is N; prints "ready", then for every iteration count
 * read from stdin runs that many start+end pairs and prints the elapsed
 * nanoseconds.
 *
 * Built by benches/hooks.rs: gcc -O2 linux_walk.c $(pkg-config --cflags
 * --libs liburcu-memb) (Debian: liburcu-dev).
 */
#define _LGPL_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <urcu/urcu-memb.h>
#include <urcu/rculist.h>

#define MMU_NOTIFIER_RANGE_BLOCKABLE (1 << 0)

struct mm_struct;

struct mmu_notifier_range {
	struct mm_struct *mm;
	unsigned long start;
	unsigned long end;
	unsigned int flags;
	int event;
	void *owner;
};

struct mmu_notifier;

struct mmu_notifier_ops {
	int (*invalidate_range_start)(struct mmu_notifier *sub,
				      const struct mmu_notifier_range *range);
	void (*invalidate_range_end)(struct mmu_notifier *sub,
				     const struct mmu_notifier_range *range);
};

struct mmu_notifier {
	struct cds_list_head hlist;
	const struct mmu_notifier_ops *ops;
	struct mm_struct *mm;
	unsigned int users;
};

struct mmu_notifier_subscriptions {
	struct cds_list_head list;
	int has_itree;
};

struct mm_struct {
	struct mmu_notifier_subscriptions *notifier_subscriptions;
};

static int trivial_start(struct mmu_notifier *sub,
			 const struct mmu_notifier_range *range)
{
	__asm__ volatile("" : : "r"(sub), "r"(range) : "memory");
	return 0;
}

static void trivial_end(struct mmu_notifier *sub,
			const struct mmu_notifier_range *range)
{
	__asm__ volatile("" : : "r"(sub), "r"(range) : "memory");
}

static const struct mmu_notifier_ops trivial_ops = {
	.invalidate_range_start = trivial_start,
	.invalidate_range_end = trivial_end,
};

static int mn_hlist_invalidate_range_start(
	struct mmu_notifier_subscriptions *subscriptions,
	struct mmu_notifier_range *range)
{
	struct mmu_notifier *subscription;
	int ret = 0;

	urcu_memb_read_lock();
	cds_list_for_each_entry_rcu(subscription, &subscriptions->list, hlist) {
		const struct mmu_notifier_ops *ops = subscription->ops;

		if (ops->invalidate_range_start) {
			int _ret = ops->invalidate_range_start(subscription, range);
			if (_ret)
				ret = _ret;
		}
	}
	urcu_memb_read_unlock();
	return ret;
}

__attribute__((noinline)) int
__mmu_notifier_invalidate_range_start(struct mmu_notifier_range *range)
{
	struct mmu_notifier_subscriptions *subscriptions =
		range->mm->notifier_subscriptions;

	if (subscriptions->has_itree)
		abort(); /* not part of this anchor */
	if (!cds_list_empty(&subscriptions->list))
		return mn_hlist_invalidate_range_start(subscriptions, range);
	return 0;
}

static void mn_hlist_invalidate_end(
	struct mmu_notifier_subscriptions *subscriptions,
	struct mmu_notifier_range *range)
{
	struct mmu_notifier *subscription;

	urcu_memb_read_lock();
	cds_list_for_each_entry_rcu(subscription, &subscriptions->list, hlist) {
		if (subscription->ops->invalidate_range_end)
			subscription->ops->invalidate_range_end(subscription, range);
	}
	urcu_memb_read_unlock();
}

__attribute__((noinline)) void
__mmu_notifier_invalidate_range_end(struct mmu_notifier_range *range)
{
	struct mmu_notifier_subscriptions *subscriptions =
		range->mm->notifier_subscriptions;

	if (subscriptions->has_itree)
		abort();
	if (!cds_list_empty(&subscriptions->list))
		mn_hlist_invalidate_end(subscriptions, range);
}

static inline int mm_has_notifiers(struct mm_struct *mm)
{
	return __builtin_expect(mm->notifier_subscriptions != NULL, 0);
}

static inline void
mmu_notifier_invalidate_range_start(struct mmu_notifier_range *range)
{
	if (mm_has_notifiers(range->mm)) {
		range->flags |= MMU_NOTIFIER_RANGE_BLOCKABLE;
		__mmu_notifier_invalidate_range_start(range);
	}
}

static inline void
mmu_notifier_invalidate_range_end(struct mmu_notifier_range *range)
{
	if (mm_has_notifiers(range->mm))
		__mmu_notifier_invalidate_range_end(range);
}

int main(int argc, char **argv)
{
	int n = argc > 1 ? atoi(argv[1]) : 1;
	struct mm_struct mm = { 0 };
	struct mmu_notifier_subscriptions subs = { 0 };
	unsigned long long iters;

	urcu_memb_register_thread();
	CDS_INIT_LIST_HEAD(&subs.list);
	for (int i = 0; i < n; i++) {
		struct mmu_notifier *sub = calloc(1, sizeof(*sub));
		sub->ops = &trivial_ops;
		sub->mm = &mm;
		cds_list_add_rcu(&sub->hlist, &subs.list);
	}
	/* Linux allocates the subscriptions at the first registration. */
	if (n > 0)
		mm.notifier_subscriptions = &subs;

	printf("ready\n");
	fflush(stdout);
	while (scanf("%llu", &iters) == 1) {
		struct timespec a, b;
		clock_gettime(CLOCK_MONOTONIC, &a);
		for (unsigned long long i = 0; i < iters; i++) {
			struct mmu_notifier_range range = {
				.mm = &mm, .start = 0x1000, .end = 0x2000, .event = 1,
			};
			__asm__ volatile("" : : "r"(&range) : "memory");
			mmu_notifier_invalidate_range_start(&range);
			mmu_notifier_invalidate_range_end(&range);
		}
		clock_gettime(CLOCK_MONOTONIC, &b);
		printf("%lld\n", (long long)(b.tv_sec - a.tv_sec) * 1000000000LL +
					 (b.tv_nsec - a.tv_nsec));
		fflush(stdout);
	}
	urcu_memb_unregister_thread();
	return 0;
}
