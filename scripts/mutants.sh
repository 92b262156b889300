#!/usr/bin/env bash
# Race mutants: re-introduce each historical race of the seed history (or
# its closest equivalent in our design) into a scratch copy of the tree and
# check that the test named for it fails. The product code has no mutant
# switches; the patches in mutants/ are kept current with it, and a patch
# that no longer applies (or no longer builds) is reported as a failure.
#
# Prints one line per mutant (`caught`, `MISSED`, `does not apply`,
# `does not build`) and `N/M caught` last; exits non-zero unless all are
# caught. Usage: scripts/mutants.sh [name...]
#
# `scripts/mutants.sh --whole-system [name...]` checks the other set instead:
# the coherence bugs in mutants/whole-system/ (a mirror that skips its
# collision check, a TLB that ignores a flush) must each make the shuttle
# whole-system test (crates/mmun/tests/shuttle.rs) fail. Shuttle's schedules
# are random, so this set is seeded (SHUTTLE_RANDOM_SEED) for repeatable runs.
#
# `scripts/mutants.sh --devices [name...]` checks the registration cache and
# its real devices: each bug in mutants/devices/ must fail its test: the
# io_uring end-to-end test (crates/uring-registrar/tests/end_to_end.rs)
# reporting bad reads, a lifecycle test of crates/regcache, or the
# userfaultfd monitor test timing out on a deadlock, or the feed's race
# tests (crates/mmfeed/tests/race.rs) counting stale lookups. It needs
# io_uring, userfaultfd and BPF (root), as those tests do.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$root/target/mutants"
tree="$work/tree"
export CARGO_TARGET_DIR="$work/target"
export LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-2}"

set_name=race
if [ "${1:-}" = --whole-system ] || [ "${1:-}" = --devices ] || [ "${1:-}" = --primary ]; then
  set_name=${1#--}
  shift
fi

# `scripts/mutants.sh --primary [name...]` checks the software primary MMU:
# each bug in mutants/primary/ (a huge-page hook, range or accounting step
# wrong) must fail its test in crates/softmm/tests.
#
# name | kind (std, loom, shuttle, embed, uring, uffd, feed, regcache or softmm) | test target | test name (empty: every
# test of the target) | what the mutant does
race_mutants=(
  "3ad3d901|std|seed|seed_3ad3d901_release_runs_before_removal_from_list|exit takes notifiers off the list before calling release"
  "751efd86|loom|loom|unregister_racing_exit_releases_exactly_once|release is not claimed: unregister racing exit runs it twice"
  "543bdb2d|loom|loom|rcu_publication_is_seen_whole|the notifier list is published without release ordering (a walk may see a half-built list)"
  "rcu-free-early|loom|loom|rcu_reader_keeps_the_old_value_until_the_grace_period|a replaced list is freed at once instead of after a grace period"
  "rcu-slots-free-early|loom|loom|rcu_slots_reader_keeps_the_count_until_the_grace_period|a value unpublished from an RcuSlots slot is released at once instead of after a grace period"
  "rcu-slots-view-torn|loom|loom|rcu_slots_view_is_never_torn|an RcuSlots view does not re-check the slot's sequence count (key, tags and value may come from two entries)"
  "c2655835|std|seed|seed_c2655835_end_called_for_all_after_failed_start|a failed start skips the ends of the starts that succeeded"
  "31956166|std|seed|seed_31956166_remove_waits_while_invalidating|remove returns while an invalidation still uses the notifier"
  "99cb252f|std|seed|seed_99cb252f_invalidate_overlapping_intervals_in_tree_order|read_retry checks for a running invalidation, not the sequence"
  "split-pair|std|invariants|registration_never_splits_a_start_end_pair|end walks the list as it is at the end, not the snapshot its start walked"
  "interval-leak|std|interval|list_failure_after_interval_phase_is_undone|a failed non-blockable list start leaves the interval phase open"
  "debug-source-ignored|embed|embed|the_debug_checks_run_on_the_embedders_contexts|the debug checks ignore the embedder's context source (none run without std)"
)
whole_system_mutants=(
  "shadow-no-in-progress|shuttle|shuttle||the KVM fault path ignores a running invalidation (checks only the sequence)"
  "shadow-no-seq|shuttle|shuttle||the KVM fault path ignores an invalidation that ended during the fault"
  "device-no-retry|shuttle|shuttle||the device mirror commits range_fault results without read_retry"
  "regcache-no-retry|shuttle|shuttle||the registration cache publishes a registration without read_retry"
  "tlb-partial-flush-ignored|shuttle|shuttle||the secondary TLB keeps one entry of a ranged flush"
)
device_mutants=(
  "no-invalidation|uring|end_to_end|fixed_reads_through_the_cache_never_lose_data|the registration cache ignores invalidations (stale fixed buffers)"
  "guard-drop-leaks|regcache|lifecycle|a_guard_outliving_the_cache_deregisters_when_dropped|dropping the last guard does not deregister"
  "raced-handle-leaks|regcache|lifecycle|a_range_invalidated_at_every_attempt_gives_busy_after_a_bounded_number|a registration raced by an invalidation is never deregistered"
  "limits-ignored|regcache|lifecycle|device_limits_count_invalidated_handles_still_held|the device's handle limit is not counted"
  "exhausted-no-retry|regcache|lifecycle|an_exhausted_device_gets_room_and_one_retry|an exhausted device gets no room and no retry"
  "access-subset-hits|regcache|lifecycle|a_hit_needs_a_superset_of_the_access_and_of_the_range|a registration with less access satisfies a lookup"
  "no-reap-on-hit|regcache|lifecycle|past_the_unreleased_bound_hits_tear_down_what_left_the_cache|invalidated registrations stay registered while the cache only hits"
  "process-interval-drop-leaks|uffd|process|dropping_a_process_interval_removes_its_notifier|dropping a ProcessInterval leaves its notifier in the tree"
  "reader-waits-for-handler|uffd|process|a_blocked_callback_does_not_stop_the_monitor_reading|the userfaultfd reader waits for the callbacks (a munmap under an allocator lock deadlocks)"
  "hit-tag-access-subset|regcache|lifecycle|a_hit_needs_a_superset_of_the_access_and_of_the_range|the lock-free hit accepts a slot whose access tag only intersects the lookup's"
  "hit-tag-end-ignored|regcache|lifecycle|a_hit_needs_a_superset_of_the_access_and_of_the_range|the lock-free hit ignores the end kept in the slot's tag"
  "hit-stamp-ignored|regcache|lifecycle|the_lru_limit_evicts_the_least_recently_used|eviction ignores the tick a lock-free hit stamped in the hit table's slot"
  "hit-slot-kept|regcache|lifecycle|with_hit_finds_cached_registrations_and_not_invalidated_ones|an invalidated registration stays in the lock-free hit table"
  "teardown-no-grace-period|regcache|lifecycle|a_registration_is_not_deregistered_under_a_running_hit|the teardown of a registration does not wait for the hit table's grace period"
  "feed-at-exit|feed|race|an_address_reused_before_its_munmap_returns_never_hits_stale|the feed's STARTs take effect only at their END (publication at syscall exit, as userfaultfd)"
  "feed-fork-unseen|feed|fork|a_forked_child_drops_the_feed|a forked child keeps looking up through the parent's feed"
  "feed-child-unregisters|feed|fork|a_forked_child_drops_the_feed|a forked child dropping its copy unregisters the parent's feed"
  "helper-wrong-process|feed|helper|a_client_without_capabilities_gets_its_own_feed_from_the_helper|the helper registers a client's feed under another process than the client's"
  "feed-overrun-ignored|feed|overrun|an_overrun_invalidates_everything_and_is_counted|a reader that fell a whole feed behind goes on without invalidating everything"
  "feed-no-begin-wait|feed|race|a_registration_racing_an_munmap_in_flight_is_never_committed_stale|a flush applies a START and returns without waiting for its END (no begin-wait)"
  "uring-madvise-unseen|feed|uring|an_io_uring_madvise_drops_the_registration_of_its_pages|io_uring's MADVISE is not fed (its programs are left unattached)"
  "uring-end-at-start|feed|uring|a_registration_racing_an_io_uring_madvise_in_flight_is_never_committed_stale|an io_uring MADVISE's START is ended at once instead of at its completion (no begin-wait for io-wq work)"
  "pins-ignored|feed|pins|a_pinned_program_set_is_reused_before_loading_one|a process loads a program set of its own although one is pinned"
  "unpaired-trusted|feed|uring_unpaired|an_io_uring_madvise_that_posts_no_completion_makes_the_feed_untrusted|a MADVISE whose end cannot be seen is invalidated and the feed still trusted"
)
primary_mutants=(
  "thp-split-unnotified|softmm|thp|a_partial_munmap_splits_the_pmd_before_the_unmap_pair|a PMD split sends no CLEAR pair over its block"
  "pmd-downgrade-unrecorded|softmm|thp|stale_tlb_entries_of_a_pmd_are_honoured_until_the_flush|a PMD entry's downgrade is not recorded as awaiting its TLB flush"
  "shared-thp-reused|softmm|thp|fork_shares_the_thp_and_a_cow_write_splits_before_copying_one_page|a write fault reuses a THP another process maps (no COW)"
  "huge-oracle-head-only|softmm|thp|the_oracle_checks_a_device_mapping_a_thp_whole_or_by_pages|the oracle checks only the first page of a device's huge mapping"
  "zap-splits-nothing|softmm|thp|madvise_dontneed_splits_a_thp_it_covers_in_part_inside_its_pair|a zap covering part of a THP zaps all of it"
  "hugetlb-cow-one-page|softmm|hugetlb|fork_of_private_hugetlb_clears_the_parent_and_cow_copies_a_huge_page|a hugetlb COW notifies only the first 4 KiB of the huge page it replaces"
  "pmd-sharing-not-widened|softmm|hugetlb|ranges_in_a_shared_vma_spanning_an_aligned_gigabyte_widen_to_it|ranges in shared hugetlb memory are not widened for PMD sharing"
)
if [ "$set_name" = race ]; then
  mutants=("${race_mutants[@]}")
  patches="$root/mutants"
elif [ "$set_name" = primary ]; then
  mutants=("${primary_mutants[@]}")
  patches="$root/mutants/primary"
elif [ "$set_name" = devices ]; then
  mutants=("${device_mutants[@]}")
  patches="$root/mutants/devices"
else
  mutants=("${whole_system_mutants[@]}")
  patches="$root/mutants/whole-system"
  export SHUTTLE_RANDOM_SEED="${SHUTTLE_RANDOM_SEED:-20261124}"
  export MMUN_SHUTTLE_ITERATIONS="${MMUN_SHUTTLE_ITERATIONS:-3000}"
fi

sync_tree() {
  rm -rf "$tree"
  mkdir -p "$tree"
  # The working tree as it is (committed or not), without build output.
  (cd "$root" && tar --exclude=./target --exclude=./.git -cf - .) | (cd "$tree" && tar -xf -)
}

cargo_test() { # kind target [test args...]
  local kind=$1 target=$2
  shift 2
  case "$kind" in
    loom) (cd "$tree" && RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR="$work/loom" \
      cargo test -q -p mmu-notifier --release --test "$target" "$@") ;;
    shuttle) (cd "$tree" && RUSTFLAGS="--cfg shuttle" CARGO_TARGET_DIR="$work/shuttle" \
      cargo test -q -p mmun --release --test "$target" "$@") ;;
    embed) (cd "$tree" && CARGO_TARGET_DIR="$work/embed" \
      cargo test -q --manifest-path crates/embed/Cargo.toml --test "$target" "$@") ;;
    uring) (cd "$tree" && cargo test -q -p uring-registrar --test "$target" "$@") ;;
    uffd) (cd "$tree" && cargo test -q -p uffd --test "$target" "$@") ;;
    # The races run twice their default time here: a mutant's stale
    # lookups come at a rate of a few per second.
    feed) (cd "$tree" && MMFEED_RACE_SECONDS="${MMFEED_RACE_SECONDS:-6}" \
      cargo test -q -p mmfeed --test "$target" "$@") ;;
    regcache) (cd "$tree" && cargo test -q -p regcache --test "$target" "$@") ;;
    softmm) (cd "$tree" && cargo test -q -p softmm --test "$target" "$@") ;;
    *) (cd "$tree" && cargo test -q -p mmu-notifier --test "$target" "$@") ;;
  esac
}

run_test() { # kind target name
  if [ -z "$3" ]; then
    cargo_test "$1" "$2"
  else
    cargo_test "$1" "$2" -- "$3" --exact
  fi
}

build_test() { # kind target
  cargo_test "$1" "$2" --no-run
}

want=("$@")
selected=()
for m in "${mutants[@]}"; do
  name=${m%%|*}
  if [ ${#want[@]} -eq 0 ] || [[ " ${want[*]} " == *" $name "* ]]; then
    selected+=("$m")
  fi
done

sync_tree
caught=0
total=0
for m in "${selected[@]}"; do
  IFS='|' read -r name kind target test what <<<"$m"
  shown=${test:-every test of $target}
  total=$((total + 1))
  # The unmutated test must pass first, or its failure would prove nothing.
  if ! run_test "$kind" "$target" "$test" >"$work/$name.base.log" 2>&1; then
    printf '%-11s MISSED   the test fails without the mutant too (see %s)\n' "$name" "$work/$name.base.log"
    continue
  fi
  patch_file="$patches/$name.patch"
  if ! (cd "$tree" && patch -p1 -s --dry-run <"$patch_file" >/dev/null 2>&1); then
    printf '%-11s does not apply\n' "$name"
    continue
  fi
  (cd "$tree" && patch -p1 -s <"$patch_file")
  if ! build_test "$kind" "$target" >"$work/$name.build.log" 2>&1; then
    printf '%-11s does not build (see %s)\n' "$name" "$work/$name.build.log"
  elif run_test "$kind" "$target" "$test" >"$work/$name.log" 2>&1; then
    printf '%-11s MISSED   %s (%s passed)\n' "$name" "$what" "$shown"
  else
    printf '%-11s caught   %s (by %s)\n' "$name" "$what" "$shown"
    caught=$((caught + 1))
  fi
  (cd "$tree" && patch -p1 -s -R <"$patch_file")
done
echo "$caught/$total caught"
[ "$caught" -eq "$total" ]
