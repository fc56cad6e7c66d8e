"""Sampling text from a trained run: temperature / top-k / top-p, KV cache, streaming.

    peer generate runs/main/peer --prompt "The President" --max-new-tokens 100

``filter_logits`` is the pure filtering step; ``generate_ids`` the token loop (with or without the
model's KV cache); ``sample`` goes from a prompt string to the generated text.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

import torch

from .errors import UsageError

__all__ = ["filter_logits", "generate_ids", "sample", "eos_token_id", "add_arguments", "run"]

# Names an end-of-text token may have in a tokenizer.json (the starter corpus's first).
_EOS_NAMES = ("<|endoftext|>", "<eos>", "</s>", "<|eos|>", "[EOS]")


def check_sampling(temperature: float, top_k: int, top_p: float, max_new_tokens: int = 0) -> None:
    """UsageError naming the first bad sampling setting (NaN and infinities included)."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise UsageError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise UsageError(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
    if not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise UsageError(f"top_p must be in (0, 1] (1 disables it), got {top_p}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UsageError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Scale by 1/temperature, then keep the ``top_k`` largest and the smallest nucleus of mass >= ``top_p``.

    ``logits`` is [..., V]; removed entries become -inf (a new tensor is returned). ``temperature=0``
    means greedy: only the argmax survives. ``top_k=0`` and ``top_p=1`` disable their filter.
    A token is kept by top-p when the probability mass of the tokens ranked above it is < top_p,
    so the most likely token always survives.
    """
    check_sampling(temperature, top_k, top_p)
    logits = logits.float()
    neg_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    if temperature == 0:
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep.scatter_(-1, logits.argmax(dim=-1, keepdim=True), True)
        return torch.where(keep, logits, neg_inf)
    logits = logits / temperature
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = torch.where(logits < kth, neg_inf, logits)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        remove_sorted = mass_before >= top_p
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = torch.where(remove, neg_inf, logits)
    return logits


def _pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None) -> int:
    """One token id from the [V] logits of the last position."""
    if temperature == 0:
        return int(logits.argmax())
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate_ids(
    model,
    ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 50,
    top_p: float = 0.95,
    seed: int | None = 0,
    use_cache: bool = True,
    eos_id: int | None = None,
    on_token: Callable[[list[int]], None] | None = None,
) -> list[int]:
    """Extend ``ids`` by up to ``max_new_tokens`` sampled tokens; returns only the new ones.

    With ``use_cache`` the prompt is run once and each new token is fed alone through the
    model's KV cache (``model.new_kv_cache`` / ``model(idx, kv_cache=cache)``); without it the
    whole sequence is recomputed every step. The context is the last ``max_seq_len`` tokens: when
    the cache is full it is rebuilt from the most recent half-context. Stops early at ``eos_id``.
    ``on_token(new_ids)`` is called after every token (for streaming).
    """
    if not ids:
        raise UsageError("the prompt is empty: give at least one token (e.g. the end-of-text token)")
    check_sampling(temperature, top_k, top_p, max_new_tokens)  # the settings, before any work
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ctx = int(model.config.max_seq_len)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed))
    seq = list(ids)
    new: list[int] = []

    def tensor(tokens: list[int]) -> torch.Tensor:
        return torch.tensor([tokens], dtype=torch.long, device=device)

    try:
        cache, cached = None, 0  # cached: tokens already in the cache
        for _ in range(max_new_tokens):
            if use_cache:
                if cache is None or cached >= ctx:
                    keep = seq[-(ctx // 2 if cache is not None else ctx) :]  # (re)start from the recent context
                    cache = model.new_kv_cache(1, ctx)
                    logits = model(tensor(keep), kv_cache=cache).logits[0, -1]
                    cached = len(keep)
                else:
                    logits = model(tensor(seq[-1:]), kv_cache=cache).logits[0, -1]
                    cached += 1
            else:
                logits = model(tensor(seq[-ctx:])).logits[0, -1]
            token = _pick(logits, temperature, top_k, top_p, generator)
            seq.append(token)
            new.append(token)
            if on_token is not None:
                on_token(new)
            if eos_id is not None and token == eos_id:
                break
    finally:
        model.train(was_training)
    return new


def eos_token_id(tokenizer) -> int | None:
    """The id of the tokenizer's end-of-text token (``peer.data.Tokenizer.eos_id``, or a
    ``tokenizers.Tokenizer``'s token with one of the usual names), or None."""
    if getattr(tokenizer, "eos_id", None) is not None:
        return int(tokenizer.eos_id)
    backend = getattr(tokenizer, "backend", tokenizer)
    for name in _EOS_NAMES:
        tid = backend.token_to_id(name)
        if tid is not None:
            return int(tid)
    return None


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` from a ``peer.data.Tokenizer`` (a list) or a ``tokenizers.Tokenizer`` (an Encoding)."""
    enc = tokenizer.encode(text)
    return list(enc.ids if hasattr(enc, "ids") else enc)


class _Streamer:
    """Prints the decoded completion as it grows, holding back a partial UTF-8 character.

    Byte-level BPE can split one character over tokens; decoding such a prefix ends in U+FFFD,
    so the full sequence is decoded each time and only a stable new suffix is written.
    """

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tokenizer, self.write, self.shown = tokenizer, write, ""

    def __call__(self, new_ids: list[int]) -> None:
        text = self.tokenizer.decode(new_ids)
        stable = text.rstrip("\ufffd")
        if stable.startswith(self.shown) and len(stable) > len(self.shown):
            self.write(stable[len(self.shown) :])
            self.shown = stable

    def finish(self, text: str) -> None:
        if text.startswith(self.shown):
            self.write(text[len(self.shown) :])
        self.shown = text


def sample(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int = 50,
    top_p: float = 0.95,
    seed: int | None = 0,
    use_cache: bool = True,
    stop_at_eos: bool = True,
    stream: Callable[[str], None] | None = None,
) -> str:
    """Generate a continuation of ``prompt`` and return it (the new text only).

    An empty prompt starts from the end-of-text token (the start of a new document).
    ``stream(text_piece)`` receives the continuation piece by piece as tokens are produced.
    """
    eos = eos_token_id(tokenizer)
    ids = _encode(tokenizer, prompt) if prompt else []
    if not ids:
        if eos is None:
            raise UsageError("--prompt is empty and the tokenizer has no end-of-text token to start from")
        ids = [eos]
    streamer = _Streamer(tokenizer, stream) if stream is not None else None
    new = generate_ids(
        model,
        ids,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        use_cache,
        eos_id=eos if stop_at_eos else None,
        on_token=streamer,
    )
    if eos is not None and new and new[-1] == eos and stop_at_eos:
        new = new[:-1]
    text = tokenizer.decode(new)
    if streamer is not None:
        streamer.finish(text)
    return text


# ------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory or checkpoint directory")
    parser.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    parser.add_argument("--top-k", type=int, default=50, help="0 disables top-k")
    parser.add_argument("--top-p", type=float, default=0.95, help="1 disables nucleus sampling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-stream", action="store_true", help="print the text once at the end")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step")


def run(args: argparse.Namespace) -> int:
    from .eval import run_tokenizer
    from .train import load_run

    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)  # before anything is printed
    model, cfg, _ = load_run(args.run)
    tokenizer = run_tokenizer(args.run, cfg)

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    if not args.no_stream:
        write(args.prompt)
    text = sample(
        model,
        tokenizer,
        args.prompt,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        args.seed,
        use_cache=not args.no_cache,
        stream=None if args.no_stream else write,
    )
    if args.no_stream:
        write(args.prompt + text)
    write("\n")
    return 0
