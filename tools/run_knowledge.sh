#!/usr/bin/env bash
# Issue 29's knowledge study and its moonshot, end to end and resumable (docs/knowledge.md, "Running it"):
# every step commits what it wrote before the next step runs, so the pre-registration order holds and an
# interrupted session loses at most the runs in flight (they resume from their checkpoints).
#   tools/run_knowledge.sh            # the whole study (the current design, v2), then the moonshot
#   tools/run_knowledge.sh study      # only the capacity study;  tools/run_knowledge.sh moonshot: only the moonshot
#   DESIGN=v1 tools/run_knowledge.sh study   # the first registered design (docs/knowledge.md: why v2 replaced it)
# Stop it with SIGTERM to its sweep (or Ctrl-C): the same command goes on where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"  # the printed corpus commands call `peer`
py=.venv/bin/python peer=.venv/bin/peer
what=${1:-all}
design=${DESIGN:-v2}
k() { $py -m studies.knowledge --design "$design" "$@"; }
read -r prefix tune_dir main_dir plot capacity_plot mix_plot < <($py -c "import studies.knowledge as K; d = K.DESIGNS['$design']
print(d.prefix, d.tune_dir, d.main_dir, d.plot, d.capacity_plot, d.mix_plot)")

tracked() {  # git's path of a file: configs/ is a link to src/peer/configs, and git does not follow links
    realpath --relative-to=. "$@"
}

commit() {  # commit the given paths if they changed
    local msg=$1; shift
    git add -- $(tracked "$@")
    git diff --cached --quiet || git commit -qm "$msg"
}

study() {
    k corpora | sh  # builds the design's corpora not built yet (none: prints nothing)
    k tune
    while true; do  # tuning: the ladder grows outward until no method's best sits at an edge
        commit "knowledge study ($design): tuning rungs (studies.knowledge tune), before their runs" "configs/${prefix}_tune.toml"
        $peer sweep "configs/${prefix}_tune.toml"  # exits non-zero (and so this script) unless every run finished
        tools/commit_finished.sh "$tune_dir" "knowledge study ($design): tuning results"
        k tune  # the file is cumulative: unchanged after a complete sweep = tuning done
        git diff --quiet -- "$(tracked "configs/${prefix}_tune.toml")" && break
    done
    k freeze
    commit "knowledge study ($design): learning rates frozen, grid written (studies.knowledge freeze), before its runs" \
        "configs/${prefix}_3e12.toml" "configs/${prefix}_1e13.toml" "configs/${prefix}_seed3.toml"
    for f in 3e12 1e13 seed3; do
        $peer sweep "configs/${prefix}_$f.toml"
        k score  # knowledge.json beside each finished run, committed with it
        tools/commit_finished.sh "$main_dir" "knowledge study ($design): ${prefix}_$f results"
        commit "knowledge study ($design): the ${prefix}_$f sweep's tables" "$main_dir"/"${prefix}_$f"_*
    done
    k report
    commit "knowledge study ($design): scored and reported" "$main_dir" "docs/img/$plot" "docs/img/$capacity_plot" "docs/img/$mix_plot"
}

moonshot() {
    $py -m studies.moonshot run --seed 0
    commit "moonshot: seed 0 (choice runs)" results/knowledge/moonshot
    [ -f results/knowledge/moonshot/choice.json ] || $py -m studies.moonshot choose
    commit "moonshot: learning rates chosen on seed 0, before the report seeds" results/knowledge/moonshot/choice.json
    for s in 1 2; do
        $py -m studies.moonshot run --seed "$s"
        commit "moonshot: seed $s" results/knowledge/moonshot
    done
    $py -m studies.moonshot report
    commit "moonshot: report" results/knowledge/moonshot docs/img/moonshot.png
}

case $what in
    all) study; moonshot ;;
    study) study ;;
    moonshot) moonshot ;;
    *) echo "usage: tools/run_knowledge.sh [all|study|moonshot]" >&2; exit 2 ;;
esac
