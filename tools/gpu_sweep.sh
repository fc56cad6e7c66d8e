#!/usr/bin/env bash
# Run a priority list of sweep runs on a CUDA machine, PARALLEL at a time (one process and one CPU thread
# each), for at most SECONDS, and keep a snapshot of every finished run in SNAPSHOT_DIR/results.tgz
# (result.json, config.toml, metrics.jsonl, sweep_job.json; paths relative to the sweep's out_dir), taken
# every 20 s and at the end, so a machine that is taken back mid-sweep still leaves what finished.
#   [DEVICE=cuda] tools/gpu_sweep.sh SWEEP.toml SNAPSHOT_DIR SECONDS PARALLEL RUN_ID...
# Runs start in the order given (peer sweep --only); unpack the snapshot into the sweep's out_dir.
set -u
[ $# -ge 5 ] || { echo "usage: $0 SWEEP.toml SNAPSHOT_DIR SECONDS PARALLEL RUN_ID..." >&2; exit 2; }
sweep=$1 snap=$2 secs=$3 par=$4
shift 4
root=$(python3 -c "import sys; from peer.experiments.sweep import load_sweep; print(load_sweep(sys.argv[1]).root)" "$sweep") || exit 2
only=()
for id in "$@"; do only+=("--only=$id"); done
mkdir -p "$snap"

snapshot() {
  (cd "$root" && find . -name result.json -printf '%h\n' | while read -r d; do
     for f in result.json config.toml metrics.jsonl sweep_job.json; do [ -f "$d/$f" ] && echo "$d/$f"; done
   done | tar czf "$snap/.results.tgz" -T -) && mv "$snap/.results.tgz" "$snap/results.tgz"
}

timeout --signal=INT --kill-after=20 "$secs" python3 -m peer sweep "$sweep" --device "${DEVICE:-cuda}" --parallel "$par" \
  --threads 1 "${only[@]}" > "$snap/sweep.log" 2>&1 &
pid=$!
t0=$(date +%s)
while kill -0 "$pid" 2>/dev/null; do
  sleep 20
  snapshot
  echo "$(( $(date +%s) - t0 ))s: $(grep -c '^\[done\]' "$snap/sweep.log") done, $(grep -c '^\[FAIL\]' "$snap/sweep.log") failed"
done
wait "$pid"
echo "sweep exit $?"
snapshot
grep -E '^\[(done|FAIL)\]' "$snap/sweep.log"
