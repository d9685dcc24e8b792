#!/usr/bin/env bash
# RocksDB's own DB test suites on BlobFS and on POSIX, side by side.
# Called by `make test-rocksdb-suites` (opt-in: the suites need the debug
# RocksDB, which `make rocksdb-debug-tools` builds):
#
#   cpp/test-rocksdb-suites.sh <dir with the suite binaries> <suite>...
#
# Each suite runs twice: on the host file system (TEST_TMPDIR under $WORK),
# then with TEST_FS_URI=blobfs://mem:6G, which DBTestBase and
# test::CreateEnvFromSystem turn into our FileSystem (a test that builds
# its own Env from Env::Default() stays on the host either way). gtest's XML reports
# are compared: a table per suite (tests run, passed on POSIX, passed on
# BlobFS) and, for each test that fails only on BlobFS, its first failure
# line. A suite that dies (no report) says so with its last output lines.
# Exit status 1 if any test fails on BlobFS that passes on POSIX.
set -uo pipefail

DIR=${1:?usage: test-rocksdb-suites.sh <dir> <suite>...}
shift
WORK=${ROCKSDB_SUITES_DIR:-$(mktemp -d /tmp/rocksdb-suites.XXXXXX)}
URI=${ROCKSDB_SUITES_URI:-blobfs://mem:6G}
# Per suite and side; a hang is a failure, not a stuck CI.
LIMIT=${ROCKSDB_SUITES_TIMEOUT:-3600}
mkdir -p "$WORK"

# Tests that are not ours, left out of the BlobFS run (gtest patterns):
# they build their Env from Env::Default(), so they run on the host file
# system whatever TEST_FS_URI says, while the fixture destroys its database
# through TEST_FS_URI's Env: each leaves its host database behind for the
# next (column_family_test's SpecialEnv(Env::Default()) tests).
declare -A NOT_OURS=(
  [column_family_test]="*.FlushCloseWALFiles/*:*.IteratorCloseWALFile1/*:*.IteratorCloseWALFile2/*:*.ForwardIteratorCloseWALFile/*"
)
export NOT_OURS_LIST=""

for suite in "$@"; do
  bin=$DIR/$suite
  [ -x "$bin" ] || { echo "$bin: not built"; exit 1; }
  for side in posix blobfs; do
    log=$WORK/$suite-$side.log
    xml=$WORK/$suite-$side.xml
    rm -f "$xml"
    # A fresh test directory per run, on the host too: inside BlobFS it is
    # created by GetTestDirectory, and the few tests that hard-code
    # Env::Default() (listed in rocksdb-env/README.md) use it on the host,
    # where an old run's databases must not be found.
    rm -rf "$WORK/tmp-$suite-$side" && mkdir -p "$WORK/tmp-$suite-$side"
    start=$(date +%s)
    if [ "$side" = blobfs ]; then
      skip=${NOT_OURS[$suite]:-}
      [ -n "$skip" ] && NOT_OURS_LIST="$NOT_OURS_LIST $suite=$skip"
      TEST_FS_URI="$URI" TEST_TMPDIR="$WORK/tmp-$suite-$side" timeout "$LIMIT" "$bin" \
        ${skip:+--gtest_filter=-$skip} --gtest_output="xml:$xml" >"$log" 2>&1
    else
      TEST_TMPDIR="$WORK/tmp-$suite-$side" timeout "$LIMIT" "$bin" \
        --gtest_output="xml:$xml" >"$log" 2>&1
    fi
    rc=$?
    rm -rf "$WORK/tmp-$suite-$side"
    echo "$suite on $side: exit $rc, $(($(date +%s) - start)) s ($log)"
  done
done

python3 - "$WORK" "$@" <<'PY'
import os, sys, xml.etree.ElementTree as ET

work, suites = sys.argv[1], sys.argv[2:]

def results(path):
    """{test: None if passed else first failure line}, or None if no report."""
    if not os.path.exists(path):
        return None
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        if case.get("status") == "notrun":
            continue
        name = f'{case.get("classname")}.{case.get("name")}'
        fail = case.find("failure")
        out[name] = None if fail is None else (fail.get("message") or "").strip().splitlines()[0:1]
    return out

def tail(path, n=3):
    try:
        with open(path, errors="replace") as f:
            return [l.rstrip() for l in f.readlines()[-n:]]
    except OSError:
        return []

import fnmatch
not_ours = {}
for item in os.environ.get("NOT_OURS_LIST", "").split():
    suite, pats = item.split("=", 1)
    not_ours[suite] = pats.split(":")

bad = 0
print("\n| suite | tests run | passed on POSIX | passed on BlobFS | fail only on BlobFS | not ours (left out on BlobFS) |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
details = []
for s in suites:
    p = results(f"{work}/{s}-posix.xml")
    b = results(f"{work}/{s}-blobfs.xml")
    if p is None or b is None:
        which = "POSIX" if p is None else "BlobFS"
        print(f"| {s} | - | - | - | {which} run died | |")
        details.append((s, f"{which} run left no report; its last lines:", tail(f"{work}/{s}-{which.lower()}.log")))
        bad += b is None
        continue
    only = sorted(t for t, r in b.items() if r is not None and p.get(t, "x") is None)
    skipped = sorted(t for t in p if t not in b and any(
        fnmatch.fnmatchcase(t, pat) for pat in not_ours.get(s, [])))
    print(f"| {s} | {len(p)} | {sum(r is None for r in p.values())} | "
          f"{sum(r is None for r in b.values())} | {len(only)} | {len(skipped)} |")
    if skipped:
        details.append((s, "not ours, left out on BlobFS (Env::Default()):", skipped))
    for t in only:
        details.append((s, t, b[t]))
    bad += len(only)
for s, what, lines in details:
    print(f"\n{s}: {what}")
    for l in lines:
        print(f"    {l}")
sys.exit(1 if bad else 0)
PY
