"""`peer demo`: build a small PEER language model, train a few steps on random tokens, print params/FLOPs.

A 30-second tour that needs no data: the same model code the real runs use.
"""

from __future__ import annotations

import time

import torch

from .config import ModelConfig, PEERConfig


def add_arguments(parser) -> None:
    parser.add_argument("--experts", type=int, default=256**2, help="number of PEER experts (a perfect square)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    from .errors import UsageError
    from .flops import count_params, flops
    from .layers.index import check_product_keys
    from .model import PeerLM

    if args.steps < 1:
        raise UsageError(f"--steps must be a positive integer, got {args.steps}")
    try:  # the demo's PEER retrieves top-8 per head: N must be a perfect square >= 8^2
        check_product_keys(args.experts, 64, 8, 4, keys_name="--experts")
    except ValueError as e:
        msg = (
            str(e) if "perfect square" in str(e) else f"--experts must be at least 64 (8 per head), got {args.experts}"
        )
        raise UsageError(msg) from None
    torch.manual_seed(args.seed)
    cfg = ModelConfig(
        vocab_size=512,
        d_model=128,
        n_layers=4,
        n_heads=4,
        max_seq_len=64,
        sparse_layer="peer",
        peer=PEERConfig(num_experts=args.experts, heads=4, topk=8, key_dim=64),
    )
    model = PeerLM(cfg)
    print(count_params(model).table())
    print(flops(model, seq_len=64).table())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # a learnable stream: token t+1 = (token t * 5 + 3) mod V, so the loss should fall well below log(V)
    t0 = time.time()
    for step in range(args.steps):
        seq = torch.randint(0, cfg.vocab_size, (16, 65))
        for t in range(1, 65):
            seq[:, t] = (seq[:, t - 1] * 5 + 3) % cfg.vocab_size
        out = model(seq[:, :-1], targets=seq[:, 1:])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {out.loss.item():.3f}  ({time.time() - t0:.1f}s)")
    return 0
