"""Export a ``peer train`` run to a Hugging Face ``transformers`` directory (``peer export RUN DIR``).

    export_run("runs/peer", "hf/peer")          # a run dir (latest checkpoint) or a checkpoint dir
    model = AutoModelForCausalLM.from_pretrained("hf/peer")   # after ``import peer.hf``
    tok = AutoTokenizer.from_pretrained("hf/peer")

DIR holds ``config.json`` (PeerConfig), ``model.safetensors`` (the PeerLM state dict under ``model.``),
``generation_config.json`` and the run's tokenizer as a ``PreTrainedTokenizerFast``
(``tokenizer.json`` + ``tokenizer_config.json``) whose end-of-text token doubles as BOS and PAD.
The directory is written next to DIR under a temporary name and moved into place at the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from .modeling import PeerForCausalLM

__all__ = ["export_run", "save_tokenizer", "to_hf_tokenizer"]


def to_hf_tokenizer(tokenizer, model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    """A ``PreTrainedTokenizerFast`` from a ``peer.data.Tokenizer``, a ``tokenizers.Tokenizer`` or a
    tokenizer.json path; the end-of-text token is EOS, BOS and PAD (GPT-2 style), padding on the right
    (PeerForCausalLM supports right padding only)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from ..data import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    backend = getattr(tokenizer, "backend", tokenizer)
    eos = getattr(tokenizer, "eos_token", None)
    if eos is None:
        from ..data.tokenizer import EOS_CANDIDATES

        eos = next((t for t in EOS_CANDIDATES if backend.token_to_id(t) is not None), None)
    if eos is None:
        raise ValueError("tokenizer: no end-of-text token found (looked for <|endoftext|>, </s>, <eos>, ...)")
    kwargs = {"model_max_length": model_max_length} if model_max_length else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, bos_token=eos, pad_token=eos,
                                   padding_side="right", model_input_names=["input_ids", "attention_mask"], **kwargs)


def save_tokenizer(tokenizer, out_dir: str | os.PathLike, model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    """Write ``tokenizer`` (see :func:`to_hf_tokenizer`) to ``out_dir`` so ``AutoTokenizer.from_pretrained`` loads it."""
    fast = to_hf_tokenizer(tokenizer, model_max_length)
    fast.save_pretrained(str(out_dir))
    return fast


def export_run(run: str | os.PathLike, out_dir: str | os.PathLike, tokenizer: bool = True,
               overwrite: bool = False) -> Path:
    """Convert a run (latest checkpoint) or a checkpoint directory to a transformers directory ``out_dir``.

    ``tokenizer=False`` skips the tokenizer (otherwise a run without one is an error naming the
    places looked at). An existing non-empty ``out_dir`` is an error unless ``overwrite``.
    """
    from ..eval import run_tokenizer
    from ..train import load_run

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"DIR {str(out)!r} exists and is not empty (pass --overwrite to replace it)")
    lm, cfg, meta = load_run(run)
    tok = run_tokenizer(run, cfg) if tokenizer else None
    ids = {}
    if tok is not None:
        if tok.vocab_size > cfg.model.vocab_size:
            raise ValueError(f"the run's tokenizer has {tok.vocab_size} ids but model.vocab_size is {cfg.model.vocab_size}")
        ids = {"eos_token_id": tok.eos_id, "bos_token_id": tok.eos_id, "pad_token_id": tok.eos_id}
    model = PeerForCausalLM.from_peer_lm(lm, **ids).eval()
    model.config.peer_source = {"checkpoint": str(meta.get("path", run)), "step": meta.get("step")}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        model.save_pretrained(str(tmp))
        if tok is not None:
            save_tokenizer(tok, tmp, model_max_length=cfg.model.max_seq_len)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
