#!/usr/bin/env bash
# Commit the finished runs of a sweep (each run folder holding a result.json): its result, config and
# metrics; checkpoints, logs and locks are git-ignored. Usage: tools/commit_finished.sh OUT_DIR MESSAGE
set -euo pipefail
out=$1 msg=$2
mapfile -t done < <(find "$out" -name result.json -printf '%h\n' | sort)
[ ${#done[@]} -gt 0 ] || { echo "no finished run under $out"; exit 0; }
git add -- "${done[@]}"
git diff --cached --quiet && { echo "nothing new"; exit 0; }
git commit -qm "$msg (${#done[@]} runs finished)" && echo "committed ${#done[@]} finished runs"
