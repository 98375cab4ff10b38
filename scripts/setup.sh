#!/usr/bin/env bash
# Installs what kvsidecar's build, tests and demo need on a fresh Debian machine with the .NET 10 SDK.
# Idempotent: skips what is already there.
set -euo pipefail

need=()
/usr/bin/python3 -c 'import torch, numpy, msgpack, pytest' 2>/dev/null || need+=(python3-torch libopenblas0-pthread python3-numpy python3-msgpack python3-pytest)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-benchmark >/dev/null 2>&1 || need+=(redis-tools)
# The CUDA driver double (tests/cuda_double) is C, built by the test command.
command -v cc >/dev/null 2>&1 || need+=(gcc libc6-dev)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  $sudo_cmd apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

command -v dotnet >/dev/null 2>&1 || { echo "setup: the .NET 10 SDK (dotnet) is required" >&2; exit 1; }
