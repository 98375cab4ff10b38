#!/usr/bin/env python3
"""Adds up xunit (trx) and pytest (junit xml) results into one closing line: N passed, N failed, N skipped."""
import glob
import os
import sys
import xml.etree.ElementTree as ET


def trx_counts(path):
    ns = {"t": "http://microsoft.com/schemas/VisualStudio/TeamTest/2010"}
    counters = ET.parse(path).getroot().find("t:ResultSummary/t:Counters", ns)
    if counters is None:
        return 0, 1, 0
    get = lambda k: int(counters.get(k, "0"))
    failed = get("failed") + get("error") + get("timeout") + get("aborted")
    # Skipped tests are counted in total but not in executed.
    skipped = max(get("notExecuted"), get("total") - get("executed"))
    return get("passed"), failed, skipped


def junit_counts(path):
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    passed = failed = skipped = 0
    for s in suites:
        tests, fail, err, skip = (int(s.get(k, "0")) for k in ("tests", "failures", "errors", "skipped"))
        failed += fail + err
        skipped += skip
        passed += tests - fail - err - skip
    return passed, failed, skipped


def main():
    results = sys.argv[1]
    passed = failed = skipped = 0
    trx = glob.glob(os.path.join(results, "dotnet", "**", "*.trx"), recursive=True)
    if not trx:
        print("no C# test results found", file=sys.stderr)
        failed += 1
    for path in trx:
        p, f, s = trx_counts(path)
        passed, failed, skipped = passed + p, failed + f, skipped + s
    junit = os.path.join(results, "pytest.xml")
    if os.path.exists(junit):
        p, f, s = junit_counts(junit)
        passed, failed, skipped = passed + p, failed + f, skipped + s
    else:
        print("no Python test results found", file=sys.stderr)
        failed += 1
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
