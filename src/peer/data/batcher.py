"""Batches of next-token prediction windows from a flat token stream.

The stream (documents joined by EOS) is cut into ``W = (len - 1) // T`` windows of ``T + 1``
tokens at stride ``T``: window ``i`` is ``tokens[i*T : i*T + T + 1]``, ``x = w[:-1]``, ``y = w[1:]``.
Inputs never overlap and every target position is predicted exactly once per epoch.

Training (``Batcher``): each epoch visits the windows in a seeded random order (a permutation
from ``PCG64([seed, epoch])``); rank ``r`` of ``world`` takes every ``world``-th entry starting
at ``r`` (a strided, disjoint shard), cut to the same length on every rank, and serves it in
batches of ``B``. So global batch ``p`` (all ranks together) is ``perm[p*G : (p+1)*G]`` with
``G = world * B``: the same windows for any number of ranks at a fixed global batch ``G``.
``state_dict()`` is (epoch, position, seed), so a resumed batcher yields exactly the batches the
uninterrupted one would.

Evaluation (``eval_batches``): all windows in order, the last batch possibly smaller.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["Batcher", "EvalBatches", "eval_batches", "num_windows"]


def num_windows(num_tokens: int, seq_len: int) -> int:
    return max(0, (num_tokens - 1) // seq_len)


def _gather(tokens: np.ndarray, window_ids: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = window_ids[:, None].astype(np.int64) * seq_len + np.arange(seq_len + 1)
    w = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class Batcher:
    """Shuffled training batches ``(x, y)``, int64 ``[batch_size, seq_len]``, forever (epoch after epoch)."""

    def __init__(
        self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1
    ):
        for name, v in (("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size)):
            if int(v) < 1:
                raise ValueError(f"Batcher: {name} must be >= 1, got {v}")
        if not 0 <= rank < world_size:
            raise ValueError(f"Batcher: rank must be in [0, world_size={world_size}), got {rank}")
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.numpy()
        self.tokens, self.batch_size, self.seq_len = tokens, int(batch_size), int(seq_len)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.num_windows = num_windows(len(tokens), self.seq_len)
        self.windows_per_rank = self.num_windows // self.world_size
        self.batches_per_epoch = self.windows_per_rank // self.batch_size
        if self.batches_per_epoch == 0:
            need = self.world_size * self.batch_size * self.seq_len + 1
            raise ValueError(
                f"Batcher: corpus too small: one batch of {self.batch_size} x {self.seq_len} tokens"
                f" on {self.world_size} rank(s) needs at least {need} tokens, got {len(tokens)}"
            )
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = -1, None

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    def _shard(self) -> np.ndarray:
        """This rank's window ids for the current epoch (cached per epoch)."""
        if self._order_epoch != self.epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, self.epoch]))
            perm = rng.permutation(self.num_windows)
            self._order = perm[self.rank :: self.world_size][: self.windows_per_rank]
            self._order_epoch = self.epoch
        return self._order

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        b = self.batch_size
        ids = self._shard()[self.position * b : (self.position + 1) * b]
        self.position += 1
        return _gather(self.tokens, ids, self.seq_len)

    __next__ = next

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_tokens": int(len(self.tokens)),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at (epoch, position, seed). The batch shape, rank layout and corpus must match."""
        now = {
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_tokens": int(len(self.tokens)),
        }
        for key, value in now.items():
            if key in state and int(state[key]) != value:
                raise ValueError(
                    f"Batcher.load_state_dict: {key} is {state[key]} in the saved state but "
                    f"{value} now; the resumed run would see different batches"
                )
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self._order_epoch = -1


class EvalBatches:
    """Every full window in order, in batches of up to ``batch_size``; ``num_tokens`` = targets scored."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, max_tokens: int | None = None):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"eval_batches: batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.numpy()
        self.tokens, self.batch_size, self.seq_len = tokens, int(batch_size), int(seq_len)
        self.num_windows = num_windows(len(tokens), self.seq_len)
        if max_tokens is not None:
            self.num_windows = min(self.num_windows, int(max_tokens) // self.seq_len)
        if self.num_windows == 0:
            raise ValueError(
                f"eval_batches: too few tokens: one window of {self.seq_len} targets needs "
                f"{self.seq_len + 1} tokens, got {len(tokens)}"
                + (f" (max_tokens={max_tokens})" if max_tokens is not None else "")
            )
        self.num_tokens = self.num_windows * self.seq_len

    def __len__(self) -> int:
        return -(-self.num_windows // self.batch_size)

    def __iter__(self):
        for start in range(0, self.num_windows, self.batch_size):
            ids = np.arange(start, min(start + self.batch_size, self.num_windows))
            yield _gather(self.tokens, ids, self.seq_len)


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_tokens: int | None = None) -> EvalBatches:
    """All non-overlapping windows in order (for perplexity); ``.num_tokens`` is the count scored."""
    return EvalBatches(tokens, batch_size, seq_len, max_tokens)
