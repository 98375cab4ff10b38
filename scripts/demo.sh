#!/usr/bin/env bash
# The main job: installs what is needed, builds the sidecar, starts it, and runs a multi-round QA
# workload (shared system prompt, several users, several rounds) through the real vLLM shim driven by
# a vLLM-faithful fake engine with real torch CPU KV tensors. Prints prefill tokens saved, the hit
# rate per round against the ideal, and the sidecar's throughput.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
echo "== building the sidecar"
KVSIDECAR_BIN="$(bash scripts/publish.sh)"
export KVSIDECAR_BIN
/usr/bin/python3 integration/demo/multi_round_qa.py --sidecar-bin "$KVSIDECAR_BIN" "$@"
echo
echo "== the same conversations with an L1 too small for them: alone, over a disk tier, over a Redis tier"
exec /usr/bin/python3 integration/demo/multi_round_qa.py --sidecar-bin "$KVSIDECAR_BIN" --compare-tiers
