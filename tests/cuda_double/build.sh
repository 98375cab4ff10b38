#!/usr/bin/env bash
# Builds the CUDA driver test double: tests/cuda_double/build.sh [OUT_DIR]
# OUT_DIR defaults to <repo>/out/cuda-double. Prints the path of libcuda-double.so as its only stdout line.
# Rebuilds only when cuda_double.c is newer than the library.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="${1:-$repo/out/cuda-double}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
so="$out/libcuda-double.so"
if [ ! -f "$so" ] || [ "$here/cuda_double.c" -nt "$so" ]; then
    # Build to a temporary name and rename, so concurrent builds never expose a half-written library.
    tmp="$out/.libcuda-double.so.$$"
    trap 'rm -f "$tmp"' EXIT
    (cd "$here" && gcc -O2 -g -shared -fPIC -pthread -Wall -Wextra -Werror -o "$tmp" cuda_double.c -lrt) >&2
    mv -f "$tmp" "$so"
fi
echo "$so"
