#!/usr/bin/env bash
# The one-seed pilot of issue 29's moonshot (docs/knowledge.md): fine-tune the screen's incumbent dense and PEER
# runs on 2,000 new facts (peer data facts --out data/facts_new --num-facts 2000 --seed 1 --tokenizer data/starter),
# fully or expert rows only; evaluate new-fact recall and the starter val loss. Outputs under runs/moon/.
cd "$(dirname "$0")/.." && mkdir -p runs/moon
S=results/confirm/screen/1.5e13
for base in dense peer; do
  OMP_NUM_THREADS=1 .venv/bin/peer eval $S/${base}_t01/d48_l4/seed10 --corpus data/starter --facts data/facts_new --batches 16 --json --no-progress --plot-dir runs/moon/plots > runs/moon/base-$base.json 2>runs/moon/base-$base.err
done
run() {  # name config extra...
  name=$1; cfg=$2; shift 2
  OMP_NUM_THREADS=1 .venv/bin/peer train $cfg --out runs/moon/$name --set data.corpus=data/facts_new train.flops=0 train.steps=200 train.threads=1 train.eval_every=0 train.tensorboard=false train.progress=false "$@" > runs/moon/$name.log 2>&1
  OMP_NUM_THREADS=1 .venv/bin/peer eval runs/moon/$name --corpus data/starter --facts data/facts_new --batches 16 --json --no-progress > runs/moon/$name.json 2>runs/moon/$name.err
}
run dense-full $S/dense_t01/d48_l4/seed10/config.toml train.init_from=$S/dense_t01/d48_l4/seed10
run peer-full $S/peer_t01/d48_l4/seed10/config.toml train.init_from=$S/peer_t01/d48_l4/seed10
run peer-sparse $S/peer_t01/d48_l4/seed10/config.toml train.init_from=$S/peer_t01/d48_l4/seed10 train.trainable=experts optim.sparse_experts=true

# sparse memory fine-tuning proper: only the 1,000 rows per layer the facts retrieve most above the starter corpus
run peer-rows1000 $S/peer_t01/d48_l4/seed10/config.toml train.init_from=$S/peer_t01/d48_l4/seed10 train.trainable=experts optim.sparse_experts=true train.expert_rows=1000 train.background=data/starter
echo done > runs/moon/done
