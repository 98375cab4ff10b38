#!/usr/bin/env bash
# Installs what is needed, builds warning-free, and runs every test: C# (xunit) and Python (pytest:
# the shim's unit tests and the fake-engine integration tests against the real sidecar process).
# Ends with the line "N passed, N failed, N skipped" counting both.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup.sh || exit 1

results="$root/out/test-results"
rm -rf "$results"
mkdir -p "$results"
status=0

echo "== build (warnings are errors)"
if ! dotnet build Connector.sln -c Release --nologo -v quiet -warnaserror; then
  echo "build failed"
  echo "0 passed, 1 failed, 0 skipped"
  exit 1
fi

KVSIDECAR_BIN="$(bash scripts/publish.sh)" || { echo "publish failed"; echo "0 passed, 1 failed, 0 skipped"; exit 1; }
export KVSIDECAR_BIN

echo "== C# tests"
for project in tests/*.Tests/*.Tests.csproj; do
  name="$(basename "$project" .csproj)"
  dotnet test "$project" -c Release --no-build --nologo -v quiet \
    --logger "trx;LogFileName=$name.trx" --logger "console;verbosity=minimal" \
    --results-directory "$results/dotnet/$name" || status=1
  [ -f "$results/dotnet/$name/$name.trx" ] || { echo "no results from $name"; status=1; }
done

echo "== Python tests"
/usr/bin/python3 -m pytest python_shim/tests integration -q -p no:cacheprovider \
  --junitxml="$results/pytest.xml" -o junit_family=xunit2
rc=$?
# 5 means pytest collected no tests: not a failure of ours, but it must be visible.
if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then status=1; fi

/usr/bin/python3 scripts/summarize_tests.py "$results" || status=1
exit $status
