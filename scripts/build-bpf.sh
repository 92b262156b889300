#!/usr/bin/env bash
# Rebuilds the feed's BPF object from its C source. Needs clang and the libbpf
# headers (Debian: apt-get install clang libbpf-dev). The object is committed:
# CI loads and tests the object that ships, not a fresh build.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="$root/crates/mmfeed/bpf"
arch=$(uname -m)
case "$arch" in x86_64) target_arch=x86 ;; aarch64) target_arch=arm64 ;; *) target_arch=$arch ;; esac
clang -O2 -g -target bpf -mcpu=v3 -D__TARGET_ARCH_$target_arch \
  -I"/usr/include/$arch-linux-gnu" \
  -c "$dir/mmfeed.bpf.c" -o "$dir/mmfeed.bpf.o"
# Debug info stays (BTF is needed for the map definitions and CO-RE); the
# DWARF sections are dropped to keep the object small.
llvm-strip -g "$dir/mmfeed.bpf.o" 2>/dev/null || true
echo "built $dir/mmfeed.bpf.o ($(stat -c %s "$dir/mmfeed.bpf.o") bytes)"
