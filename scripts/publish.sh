#!/usr/bin/env bash
# Builds the sidecar daemon into out/sidecar (framework-dependent; add -r linux-x64 --self-contained for machines without .NET).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dotnet publish "$root/src/Sidecar/Connector.Sidecar/Connector.Sidecar.csproj" -c Release -o "$root/out/sidecar" --nologo -v quiet "$@" >/dev/null
echo "$root/out/sidecar/kvsidecar.dll"
