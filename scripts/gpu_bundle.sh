#!/usr/bin/env bash
# Builds what a GPU machine without .NET needs to run integration/gpu/run_gpu_checks.py: a self-contained linux-x64
# kvsidecar in out/gpu-bundle/sidecar, packed as out/gpu-bundle.tar.gz (at most 64 MiB: what the device machine
# carries). The repository's tracked files (python_shim, integration, tests/cuda_double) travel anyway.
#
#   scripts/gpu_bundle.sh [--trim | --no-trim] [--no-check]
#
# Default: a partially trimmed publish (PublishTrimmed, TrimMode=partial: only framework assemblies marked trimmable
# are trimmed; ours stay whole, so the protocol's reflection keeps working), kept only if it passes the driver-double
# run of run_gpu_checks.py (--backend double --quick); otherwise, or when that check cannot run here (it needs
# /usr/bin/python3 with torch and msgpack, and gcc), the untrimmed publish. --trim keeps the trimmed one without the
# check; --no-trim never trims; --no-check skips the double run of the final bundle as well.
# Prints the tarball's path and size last. Builds in out/gpu-bundle/.artifacts, away from the tree's bin/ and obj/.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
mode=auto
check=1
for arg in "$@"; do
  case "$arg" in
    --trim) mode=trim ;;
    --no-trim) mode=notrim ;;
    --no-check) check=0 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "gpu_bundle.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

bundle="$root/out/gpu-bundle"
sidecar_dir="$bundle/sidecar"
tarball="$root/out/gpu-bundle.tar.gz"
python="${PYTHON:-/usr/bin/python3}"
limit=$((64 << 20))

publish() {  # publish <trim|notrim> <output dir>
  local extra=()
  if [ "$1" = trim ]; then
    # The trim analyzer's warnings (reflection in Connector.Protocol) would be errors under TreatWarningsAsErrors;
    # partial trimming leaves our assemblies whole, so they are only noise here.
    extra=(-p:PublishTrimmed=true -p:TrimMode=partial -p:EnableTrimAnalyzer=false -p:SuppressTrimAnalysisWarnings=true
           -p:TreatWarningsAsErrors=false)
  fi
  rm -rf "$2"
  dotnet publish src/Sidecar/Connector.Sidecar/Connector.Sidecar.csproj -c Release -r linux-x64 --self-contained \
    --artifacts-path "$bundle/.artifacts" -o "$2" --nologo -v quiet "${extra[@]}" >&2
  test -x "$2/kvsidecar"
}

can_check() {
  command -v gcc >/dev/null && "$python" -c "import torch, msgpack" 2>/dev/null
}

double_check() {  # double_check <sidecar dir>: the whole GPU script on the driver double
  echo "== checking $1/kvsidecar with the driver double (run_gpu_checks.py --backend double --quick)" >&2
  "$python" integration/gpu/run_gpu_checks.py --sidecar "$1/kvsidecar" --backend double --quick >&2
}

mkdir -p "$bundle"
trimmed=no
if [ "$mode" != notrim ]; then
  echo "== publishing a trimmed self-contained kvsidecar (TrimMode=partial)" >&2
  if publish trim "$sidecar_dir"; then
    if [ "$mode" = trim ]; then
      trimmed=yes
    elif can_check && double_check "$sidecar_dir"; then
      trimmed=yes
      check=0  # just checked
    else
      echo "== the trimmed bundle is not kept (it failed the double run, or the check cannot run here)" >&2
    fi
  else
    echo "== the trimmed publish failed" >&2
  fi
fi
if [ "$trimmed" = no ]; then
  echo "== publishing an untrimmed self-contained kvsidecar" >&2
  publish notrim "$sidecar_dir"
fi
if [ "$check" = 1 ]; then
  if can_check; then
    double_check "$sidecar_dir" || { echo "gpu_bundle.sh: the bundle failed the double run" >&2; exit 1; }
  else
    echo "== not checked with the driver double ($python lacks torch or msgpack, or gcc is missing)" >&2
  fi
fi

{
  echo "kvsidecar GPU bundle"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- src 2>/dev/null || echo ' (src modified)')"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -srm)"
  echo "trimmed: $trimmed"
  echo "version: $("$sidecar_dir/kvsidecar" --version 2>/dev/null || echo '?')"
} > "$sidecar_dir/BUNDLE.txt"

rm -f "$tarball"
tar -C "$root/out" -czf "$tarball" gpu-bundle/sidecar
size=$(stat -c %s "$tarball")
unpacked=$(du -sb "$sidecar_dir" | cut -f1)
echo "== out/gpu-bundle.tar.gz: $((size >> 20)) MiB ($size bytes; unpacked $((unpacked >> 20)) MiB; trimmed: $trimmed)" >&2
if [ "$size" -gt "$limit" ]; then
  echo "gpu_bundle.sh: the tarball is larger than 64 MiB, more than the device machine carries" >&2
  exit 1
fi
echo "$tarball $size"
