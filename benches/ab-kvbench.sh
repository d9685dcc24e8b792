#!/usr/bin/env bash
# A/B of two builds of the stack on kvbench, in one script: runs kvbench
# with db_bench binary A, then B, ROUNDS times alternating, with the same
# kvbench arguments, and prints each run's BlobFS/POSIX ops/s ratios and
# the median per build. Ratios, not raw ops/s, because each kvbench run
# measures POSIX beside BlobFS on the same (shared, noisy) machine.
#
#   benches/ab-kvbench.sh <kvbench> <db_bench A> <db_bench B> [kvbench args...]
#
# ROUNDS (default 3) sets the alternations; OUT (default a fresh /tmp dir)
# keeps every run's tables and JSON. E.g. A = a db_bench built from the
# commit before a change (make rocksdb-tools in a worktree of it, then copy
# $TARGET_DIR/rocksdb/db_bench aside), B = one built from the change.
set -euo pipefail

KVBENCH=${1:?usage: ab-kvbench.sh <kvbench> <db_bench A> <db_bench B> [kvbench args...]}
A=${2:?db_bench A}
B=${3:?db_bench B}
shift 3
ROUNDS=${ROUNDS:-3}
OUT=${OUT:-$(mktemp -d /tmp/ab-kvbench.XXXXXX)}
mkdir -p "$OUT"

# "config phase ratio" for each BlobFS row of a kvbench table (the ops/s
# ratio: third column from the end).
ratios() {
  awk '/^### / { config = $2 }
       /^\| [a-z]+ \| BlobFS \|/ {
         n = split($0, f, "|"); r = f[n - 3]; gsub(/[ x]/, "", r)
         p = f[2]; gsub(/ /, "", p); print config, p, r }' "$1"
}

for round in $(seq 1 "$ROUNDS"); do
  for side in A B; do
    bin=$A
    [ "$side" = B ] && bin=$B
    dir=$OUT/$side-$round
    "$KVBENCH" --db-bench "$bin" --out "$dir" "$@" >"$dir.txt" 2>"$dir.err"
    ratios "$dir.txt" | while read -r config phase r; do
      echo "ab run $round $side $config $phase $r"
    done
  done
done | tee "$OUT/runs.txt"

echo
echo "median BlobFS/POSIX ops/s over $ROUNDS runs (A = $A, B = $B):"
awk '{ k = $5 " " $6; v[$4, k, ++n[$4, k]] = $7; keys[k] = 1 }
     END {
       for (k in keys) {
         line = k
         for (s = 1; s <= 2; s++) {
           side = (s == 1) ? "A" : "B"; m = n[side, k]
           for (i = 1; i <= m; i++) a[i] = v[side, k, i]
           for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++)
             if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
           med = (m % 2) ? a[(m + 1) / 2] : (a[m / 2] + a[m / 2 + 1]) / 2
           line = line sprintf("  %s %.2f", side, med)
         }
         print line
       }
     }' "$OUT/runs.txt" | sort
echo "(runs in $OUT)"
