#!/usr/bin/env bash
# Issue 29's knowledge study and its moonshot, end to end and resumable (docs/knowledge.md, "Running it"):
# every step commits what it wrote before the next step runs, so the pre-registration order holds and an
# interrupted session loses at most the runs in flight (they resume from their checkpoints).
#   tools/run_knowledge.sh            # the whole study, then the moonshot
#   tools/run_knowledge.sh study      # only the capacity study;  tools/run_knowledge.sh moonshot: only the moonshot
# Stop it with SIGTERM to its sweep (or Ctrl-C): the same command goes on where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"  # the printed corpus commands call `peer`
py=.venv/bin/python peer=.venv/bin/peer
what=${1:-all}

tracked() {  # git's path of a file: configs/ is a link to src/peer/configs, and git does not follow links
    realpath --relative-to=. "$@"
}

commit() {  # commit the given paths if they changed
    local msg=$1; shift
    git add -- $(tracked "$@")
    git diff --cached --quiet || git commit -qm "$msg"
}

study() {
    for c in text2k facts2k facts8k facts32k mix8k; do
        [ -f "data/knowledge/$c/manifest.json" ] || { $py -m studies.knowledge corpora | sh; break; }
    done
    $py -m studies.knowledge tune
    while true; do  # tuning: the ladder grows outward until no method's best sits at an edge
        commit "knowledge study: tuning rungs (python -m studies.knowledge tune), before their runs" configs/knowledge_tune.toml
        $peer sweep configs/knowledge_tune.toml  # exits non-zero (and so this script) unless every run finished
        tools/commit_finished.sh results/knowledge/tune "knowledge study: tuning results"
        $py -m studies.knowledge tune  # the file is cumulative: unchanged after a complete sweep = tuning done
        git diff --quiet -- "$(tracked configs/knowledge_tune.toml)" && break
    done
    $py -m studies.knowledge freeze
    commit "knowledge study: learning rates frozen, grid written (python -m studies.knowledge freeze), before its runs" \
        configs/knowledge_3e12.toml configs/knowledge_1e13.toml configs/knowledge_seed3.toml
    for f in knowledge_3e12 knowledge_1e13 knowledge_seed3; do
        $peer sweep "configs/$f.toml"
        tools/commit_finished.sh results/knowledge/main "knowledge study: $f results"
    done
    $py -m studies.knowledge score
    $py -m studies.knowledge report
    commit "knowledge study: scored and reported" results/knowledge/main docs/img/knowledge_bits.png
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
