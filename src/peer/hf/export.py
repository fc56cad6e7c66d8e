"""Export a ``peer train`` run to a Hugging Face ``transformers`` directory (``peer export RUN DIR``).

    export_run("runs/peer", "hf/peer")          # a run dir (latest checkpoint) or a checkpoint dir
    model = AutoModelForCausalLM.from_pretrained("hf/peer", trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained("hf/peer")

(or, after ``import peer.hf``, without ``trust_remote_code``.)

DIR holds ``config.json`` (PeerConfig), ``model.safetensors`` (the PeerLM state dict under ``model.``),
``generation_config.json``, the run's tokenizer as a ``PreTrainedTokenizerFast``
(``tokenizer.json`` + ``tokenizer_config.json``) whose end-of-text token doubles as BOS and PAD, and
two one-line modules, ``configuration_peer.py`` and ``modeling_peer.py``, that ``config.json``'s
``auto_map`` names: they import the classes from the installed ``peer`` package, so
``trust_remote_code=True`` loads the folder in a process that never imported ``peer.hf`` (the
package must be installed: ``pip install "peer-experts[hf]"``; no model code is copied).
The directory is written next to DIR under a temporary name and moved into place at the end.

No data loss: DIR must be missing, empty, or (with ``overwrite``) a previous export — a folder that
holds only the files an export writes. A run, a corpus, sweep results or any other folder is
never replaced, whatever the flags; DIR may not be the run or hold it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from ..errors import UsageError, disk_full_as_error
from ..fsutil import FolderLock, folder_kind, make_temp_dir, umask
from ..model import merge_lora
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
        raise UsageError("tokenizer: no end-of-text token found (looked for <|endoftext|>, </s>, <eos>, ...)")
    kwargs = {"model_max_length": model_max_length} if model_max_length else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=eos,
        bos_token=eos,
        pad_token=eos,
        padding_side="right",
        model_input_names=["input_ids", "attention_mask"],
        **kwargs,
    )


def save_tokenizer(
    tokenizer, out_dir: str | os.PathLike, model_max_length: int | None = None
) -> PreTrainedTokenizerFast:
    """Write ``tokenizer`` (see :func:`to_hf_tokenizer`) to ``out_dir`` so ``AutoTokenizer.from_pretrained`` loads it."""
    fast = to_hf_tokenizer(tokenizer, model_max_length)
    fast.save_pretrained(str(out_dir))
    return fast


def export_run(
    run: str | os.PathLike, out_dir: str | os.PathLike, tokenizer: bool = True, overwrite: bool = False
) -> Path:
    """Convert a run (latest checkpoint) or a checkpoint directory to a transformers directory ``out_dir``.

    ``tokenizer=False`` skips the tokenizer (otherwise a run without one is an error naming the
    places looked at). An existing non-empty ``out_dir`` is an error unless it is a previous export
    and ``overwrite`` is set (see the module docstring).
    """
    from ..eval import run_tokenizer
    from ..train import load_run

    out = Path(out_dir)
    check_export_target(run, out, overwrite)
    lm, cfg, meta = load_run(run)
    lm = merge_lora(lm)  # a LoRA fine-tune exports as the plain model it equals
    tok = run_tokenizer(run, cfg) if tokenizer else None
    ids = {}
    if tok is not None:
        if tok.vocab_size > cfg.model.vocab_size:
            raise UsageError(
                f"the run's tokenizer has {tok.vocab_size} ids but model.vocab_size is {cfg.model.vocab_size}"
            )
        ids = {"eos_token_id": tok.eos_id, "bos_token_id": tok.eos_id, "pad_token_id": tok.eos_id}
    model = PeerForCausalLM.from_peer_lm(lm, **ids).eval()
    model.config.peer_source = {"checkpoint": str(meta.get("path", run)), "step": meta.get("step")}

    with disk_full_as_error(out, "the export"):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(out.parent, f".{out.name}.tmp-")
        try:
            model.save_pretrained(str(tmp))
            _write_auto_map(tmp)
            if tok is not None:
                save_tokenizer(tok, tmp, model_max_length=cfg.model.max_seq_len)
            for f in tmp.rglob("*"):  # transformers writes through tempfile: give files the umask's mode
                os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask())
            if out.exists():
                with FolderLock(out, "export folder"):
                    check_export_target(run, out, overwrite)  # re-checked under the lock, just before replacing
                    old = out.with_name(f".{out.name}.old-{os.getpid()}")
                    os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)  # a previous export (checked above): ours to delete
            else:
                os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


_SHIMS = {
    "configuration_peer.py": ("PeerConfig", "peer.hf.configuration", "AutoConfig"),
    "modeling_peer.py": ("PeerForCausalLM", "peer.hf.modeling", "AutoModelForCausalLM"),
}


def _write_auto_map(folder: Path) -> None:
    """The ``auto_map`` of config.json and the one-line modules it names (see the module docstring)."""
    auto_map = {}
    for file, (cls, module, auto) in _SHIMS.items():
        (folder / file).write_text(
            f'"""Loads this export with trust_remote_code=True: the class comes from the installed peer package."""\n\n'
            f'from {module} import {cls}\n\n__all__ = ["{cls}"]\n',
            encoding="utf-8",
        )
        auto_map[auto] = f"{file.removesuffix('.py')}.{cls}"
    config = folder / "config.json"
    data = json.loads(config.read_text(encoding="utf-8"))
    data["auto_map"] = auto_map
    config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def check_export_target(run: str | os.PathLike, out: Path, overwrite: bool) -> None:
    """Refuse a DIR that would lose data: the run itself or a folder holding it, a run, a corpus,
    sweep results, any non-export folder; a previous export only with ``overwrite``."""
    src, dst = Path(run).resolve(), out.resolve()
    if out.exists() and not out.is_dir():
        raise UsageError(f"DIR {str(out)!r} is a file, not a folder: give the path of a new export folder")
    if dst == src or dst in src.parents:
        raise UsageError(f"DIR {str(out)!r} is the run {str(run)!r} or holds it: choose another export folder")
    kind = folder_kind(out)
    if kind is None:
        return
    if kind == "export":
        if not overwrite:
            raise UsageError(f"DIR {str(out)!r} holds a previous export (pass --overwrite to replace it)")
        return
    what = {"run": "a training run", "corpus": "a corpus", "sweep": "sweep results"}.get(
        kind, "files that peer export did not write"
    )
    raise UsageError(
        f"DIR {str(out)!r} holds {what}; peer export never replaces it (--overwrite replaces "
        "a previous export only): choose another folder"
    )
