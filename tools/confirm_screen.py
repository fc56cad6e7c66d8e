"""Write configs/confirm_screen.toml: the screening stage of the confirmation protocol (docs/confirmation.md).

    python tools/confirm_screen.py            # (re)writes the sweep file; the draws are fixed by the seeds below

Every method gets the same number of trials (TRIALS) at the main job's budget and backbone, one seed
(SCREEN_SEED): its incumbent (the shipped preset; MoE's with the causal dropless routing) and TRIALS - 1
configurations drawn without replacement from its own discrete search space, by a random.Random seeded
with the method's name. Nothing here reads a result: the file is the pre-registration of the screen.
Variants are interleaved by trial (dense_t01, moe_t01, pkm_t01, peer_t01, dense_t02, ...), so that any
prefix of the sweep has the same number of trials of every method.
"""

from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

TRIALS = 16
SCREEN_SEED = 10
OUT = Path(__file__).resolve().parents[1] / "configs" / "confirm_screen.toml"
LRS = [3e-3, 6e-3, 1.2e-2, 2.4e-2]
WARMUP = [20, 100]

# each method: (what every trial sets, its search space {knob: values}, its incumbent {knob: value});
# a knob whose value is a list of overrides (PKM's shape) sets several fields at once
SPACES: dict[str, tuple[list[str], dict[str, list], dict]] = {
    "dense": (
        ["model.sparse_layer=none"],
        {
            "optim.lr": LRS,
            "optim.warmup_steps": WARMUP,
            "optim.weight_decay": [0.0, 0.1],
            "model.init_std": [0.01, 0.02, 0.04],
            "model.d_ff": [96, 192, 384],  # d_ff / d_model = 2, 4, 8 (steps follow from the FLOP budget)
        },
        {
            "optim.lr": 6e-3,
            "optim.warmup_steps": 20,
            "optim.weight_decay": 0.1,
            "model.init_std": 0.02,
            "model.d_ff": 192,
        },
    ),  # configs/dense.toml
    "moe": (
        ["model.sparse_layer=moe", "model.moe.routing=dropless"],
        {
            "optim.lr": LRS,
            "optim.warmup_steps": WARMUP,
            "model.moe.num_experts": [8, 16, 32, 64, 128],
            "model.moe.topk": [1, 2],
            "model.moe.aux_loss_weight": [0.001, 0.01, 0.1],
        },
        {
            "optim.lr": 3e-3,
            "optim.warmup_steps": 20,
            "model.moe.num_experts": 128,
            "model.moe.topk": 1,
            "model.moe.aux_loss_weight": 0.01,
        },
    ),  # configs/moe.toml, routed causally
    "pkm": (
        ["model.sparse_layer=pkm", "optim.expert_lr_mult_schedule=cosine"],
        {
            "optim.lr": LRS,
            "optim.warmup_steps": WARMUP,
            "shape": [
                ("model.pkm.heads=8", "model.pkm.topk=32", "model.pkm.key_dim=32"),  # the paper's, scaled
                ("model.pkm.heads=4", "model.pkm.topk=8", "model.pkm.key_dim=16"),
            ],  # the one PEER won with
            "model.pkm.num_memories": [16384, 65536],
            "optim.expert_lr_mult": [1, 3],  # x3 decays to x1 (cosine), as PEER's recipe
            "model.pkm.value_init_scale": [0.03, 0.1, 1.0],
            "optim.expert_weight_decay": [0.0, 0.1],
        },
        {
            "optim.lr": 3e-3,
            "optim.warmup_steps": 20,
            "shape": ("model.pkm.heads=8", "model.pkm.topk=32", "model.pkm.key_dim=32"),
            "model.pkm.num_memories": 65536,
            "optim.expert_lr_mult": 1,
            "model.pkm.value_init_scale": 1.0,
            "optim.expert_weight_decay": 0.0,
        },
    ),  # configs/pkm.toml
    "peer": (
        [
            "model.sparse_layer=peer",
            "model.peer.num_experts=65536",
            "model.peer.heads=4",
            "model.peer.topk=8",
            "model.peer.key_dim=16",
            "optim.expert_lr_mult_schedule=cosine",
        ],
        {
            "optim.lr": [3e-3, 4.2e-3, 6e-3, 8.5e-3, 1.2e-2],  # bracketed around the recipe's 6e-3 (issue 28)
            "optim.warmup_steps": WARMUP,
            "optim.expert_lr_mult": [1, 3],
            "model.peer.value_init_scale": [0.03, 0.1],
            "optim.expert_weight_decay": [0.0, 0.1],
        },
        {
            "optim.lr": 6e-3,
            "optim.warmup_steps": 20,
            "optim.expert_lr_mult": 3,
            "model.peer.value_init_scale": 0.03,
            "optim.expert_weight_decay": 0.1,
        },
    ),  # configs/peer.toml
}


def _overrides(point: dict) -> list[str]:
    out = []
    for knob, value in point.items():
        out += (
            list(value)
            if isinstance(value, tuple)
            else [f"{knob}={value!r}" if isinstance(value, str) else f"{knob}={value}"]
        )
    return out


def trials(method: str) -> list[dict]:
    """The incumbent, then TRIALS - 1 distinct draws from the method's space (never the incumbent again)."""
    _, space, incumbent = SPACES[method]
    points = [dict(zip(space, combo, strict=True)) for combo in itertools.product(*space.values())]
    if incumbent not in points:
        raise SystemExit(f"{method}: the incumbent is not in its own search space")
    rest = [p for p in points if p != incumbent]
    return [incumbent] + random.Random(f"issue28-screen-{method}").sample(rest, TRIALS - 1)


def sweep_text() -> str:
    lines = [
        "# GENERATED by tools/confirm_screen.py: do not edit by hand (rerun it). The screening stage of the",
        "# confirmation protocol, docs/confirmation.md: 16 trials per method (the incumbent first, then 15",
        f"# draws from the method's own space), one seed ({SCREEN_SEED}), the main job's budget and backbone; chosen on",
        "# every token of val. Interleaved by trial: any prefix has as many trials of every method.",
        "#   peer sweep plan configs/confirm_screen.toml",
        "#   peer sweep configs/confirm_screen.toml          # resumable; two one-thread runs side by side",
        "[sweep]",
        'name = "confirm_screen"',
        'out_dir = "results/confirm/screen"',
        "budgets = [1.5e13]",
        f"seeds = [{SCREEN_SEED}]",
        'base = "recipe/base_dense.toml"',
        'set = ["train.eval_every=0", "train.ckpt_every=500", "train.keep_last=1", "train.tensorboard=false",',
        '       "train.progress=false", "model.d_model=48", "model.n_layers=4", "model.n_heads=2", "model.d_ff=0"]',
        "min_steps = 50",
        "parallel = 2",
        "threads = 1",
        "eval_batches = 64  # val has 41 batches of 16 x 128: every val token is scored",
        "",
        "[[sizes]]",
        'name = "d48_l4"',
        "set = []",
        "",
    ]
    per_method = {m: trials(m) for m in SPACES}
    for t in range(TRIALS):
        for method, points in per_method.items():
            fixed = SPACES[method][0]
            note = "  # the incumbent" if t == 0 else ""
            body = ", ".join(f'"{o}"' for o in fixed + _overrides(points[t]))
            lines += [f"[variants.{method}_t{t + 1:02d}]{note}", f"set = [{body}]"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    OUT.write_text(sweep_text())
    print(f"wrote {OUT}: {TRIALS} trials x {len(SPACES)} methods", file=sys.stderr)
