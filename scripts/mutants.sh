#!/usr/bin/env bash
# Race mutants: re-introduce each historical race of the seed history (or
# its closest equivalent in our design) into a scratch copy of the tree and
# check that the test named for it fails. The product code has no mutant
# switches; the patches in mutants/ are kept current with it, and a patch
# that no longer applies (or no longer builds) is reported as a failure.
#
# Prints one line per mutant (`caught`, `MISSED`, `does not apply`,
# `does not build`) and `N/8 caught` last; exits non-zero unless all are
# caught. Usage: scripts/mutants.sh [name...]
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$root/target/mutants"
tree="$work/tree"
export CARGO_TARGET_DIR="$work/target"
export LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-2}"

# name | kind (std or loom) | test target | test name | what the mutant does
mutants=(
  "3ad3d901|std|seed|seed_3ad3d901_release_runs_before_removal_from_list|exit takes notifiers off the list before calling release"
  "751efd86|loom|loom|unregister_racing_exit_releases_exactly_once|release is not claimed: unregister racing exit runs it twice"
  "543bdb2d|std|seed|seed_543bdb2d_registered_notifier_seen_by_a_thread_with_a_cached_list|a reader trusts its cached list without the published version"
  "c2655835|std|seed|seed_c2655835_end_called_for_all_after_failed_start|a failed start skips the ends of the starts that succeeded"
  "31956166|std|seed|seed_31956166_remove_waits_while_invalidating|remove returns while an invalidation still uses the notifier"
  "99cb252f|std|seed|seed_99cb252f_invalidate_overlapping_intervals_in_tree_order|read_retry checks for a running invalidation, not the sequence"
  "spec-10.10|std|invariants|registration_never_splits_a_start_end_pair|end calls notifiers registered after its start"
  "spec-10.1|std|interval|list_failure_after_interval_phase_is_undone|a failed non-blockable list start leaves the interval phase open"
)

sync_tree() {
  rm -rf "$tree"
  mkdir -p "$tree"
  # The working tree as it is (committed or not), without build output.
  (cd "$root" && tar --exclude=./target --exclude=./.git -cf - .) | (cd "$tree" && tar -xf -)
}

run_test() { # kind target name
  local kind=$1 target=$2 name=$3
  if [ "$kind" = loom ]; then
    (cd "$tree" && RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR="$work/loom" \
      cargo test -q -p mmu-notifier --release --test "$target" -- "$name" --exact)
  else
    (cd "$tree" && cargo test -q -p mmu-notifier --test "$target" -- "$name" --exact)
  fi
}

build_test() { # kind target
  local kind=$1 target=$2
  if [ "$kind" = loom ]; then
    (cd "$tree" && RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR="$work/loom" \
      cargo test -q -p mmu-notifier --release --test "$target" --no-run)
  else
    (cd "$tree" && cargo test -q -p mmu-notifier --test "$target" --no-run)
  fi
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
  total=$((total + 1))
  # The unmutated test must pass first, or its failure would prove nothing.
  if ! run_test "$kind" "$target" "$test" >"$work/$name.base.log" 2>&1; then
    printf '%-11s MISSED   the test fails without the mutant too (see %s)\n' "$name" "$work/$name.base.log"
    continue
  fi
  patch_file="$root/mutants/$name.patch"
  if ! (cd "$tree" && patch -p1 -s --dry-run <"$patch_file" >/dev/null 2>&1); then
    printf '%-11s does not apply\n' "$name"
    continue
  fi
  (cd "$tree" && patch -p1 -s <"$patch_file")
  if ! build_test "$kind" "$target" >"$work/$name.build.log" 2>&1; then
    printf '%-11s does not build (see %s)\n' "$name" "$work/$name.build.log"
  elif run_test "$kind" "$target" "$test" >"$work/$name.log" 2>&1; then
    printf '%-11s MISSED   %s (%s passed)\n' "$name" "$what" "$test"
  else
    printf '%-11s caught   %s (by %s)\n' "$name" "$what" "$test"
    caught=$((caught + 1))
  fi
  (cd "$tree" && patch -p1 -s -R <"$patch_file")
done
echo "$caught/$total caught"
[ "$caught" -eq "$total" ]
