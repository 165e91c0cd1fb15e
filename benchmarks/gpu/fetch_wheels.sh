#!/usr/bin/env bash
# Fill .whl/ (repo root) with the wheels of wheels.txt for the GPU machine (CPython 3.12,
# x86_64 manylinux). Run on a machine that reaches PyPI; the GPU machine reaches nothing.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
dest="$root/.whl"
mkdir -p "$dest"
grep -qs '^/.whl/$' "$root/.git/info/exclude" || echo /.whl/ >>"$root/.git/info/exclude"
mapfile -t pins < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$(dirname "$0")/wheels.txt" | grep .)
for pin in "${pins[@]}"; do
  name="${pin%%==*}"
  if [[ "$name" == deepspeed || "$name" == sam2 || "$name" == antlr4-python3-runtime || "$name" == iopath ]]; then
    # sdists only: build pure-Python wheels (no ops precompiled; DeepSpeed JIT-builds any it needs;
    # sam2 without its CUDA op, which only post-processes video masks; its build imports torch).
    tmp="$(mktemp -d)"
    python3 -m pip download -q --no-deps --no-binary=:all: -d "$tmp" "$pin"
    SAM2_BUILD_CUDA=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w "$dest" "$tmp"/*.tar.gz
    rm -rf "$tmp"
  else
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$dest" "$pin"
  fi
done
ls -l "$dest"
