"""Byte-level BPE tokenizer (``tokenizers``) with ``<|endoftext|>`` as the end-of-document id.

    tok = train_tokenizer(texts, vocab_size=8192)   # GPT-2 style: bytes, no unknown token
    tok.save("corpus/tokenizer.json")
    tok = load_tokenizer("corpus")                   # a corpus dir or any tokenizer.json
    ids = tok.encode("Hello"); tok.decode(ids) == "Hello"

Byte-level BPE round-trips every string exactly (``decode(encode(s)) == s``). A user's own
tokenizer.json works too; its end-of-document token is the first of ``EOS_CANDIDATES`` it
has, or the one named by ``eos_token``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..fsutil import atomic_write_text
from .sources import DataError

__all__ = ["EOS_TOKEN", "EOS_CANDIDATES", "Tokenizer", "train_tokenizer", "load_tokenizer"]

EOS_TOKEN = "<|endoftext|>"
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the id that ends a document (``eos_id``)."""

    def __init__(self, backend, eos_token: str | None = None, path: str | None = None):
        self.backend = backend
        self.path = path
        names = (eos_token,) if eos_token else EOS_CANDIDATES
        ids = [(n, backend.token_to_id(n)) for n in names]
        found = [(n, i) for n, i in ids if i is not None]
        if not found:
            raise DataError(
                f"tokenizer {path or '(in memory)'}: no end-of-document token; looked for "
                f"{', '.join(names)} (pass eos_token= / --eos-token to name it)"
            )
        self.eos_token, self.eos_id = found[0]
        # ids run 0..vocab_size-1; added tokens may sit above the model vocab
        self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        pre = backend.pre_tokenizer
        self._piecewise = (
            backend.normalizer is None
            and type(pre).__name__ == "ByteLevel"
            and not pre.add_prefix_space
            and pre.use_regex
        )

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text. Long texts are encoded in pieces when that is exact (see ``_pieces``)."""
        return [a.tolist() for a in self.encode_arrays(texts)]

    def encode_arrays(self, texts: list[str], dtype=np.int64, group_chars: int = 1 << 21) -> list[np.ndarray]:
        """Ids of each text as one ``dtype`` array, like :meth:`encode_batch` but with bounded memory:
        pieces go to the backend about ``group_chars`` chars at a time and only their ids are kept."""
        if not self._piecewise:
            return [np.asarray(e.ids, dtype=dtype) for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        out = []
        for text in texts:
            parts, group, size = [], [], 0
            for piece in _pieces(text) + [None]:
                if group and (piece is None or size + len(piece) > group_chars):
                    parts += [
                        np.asarray(e.ids, dtype=dtype)
                        for e in self.backend.encode_batch(group, add_special_tokens=False)
                    ]
                    group, size = [], 0
                if piece is not None:
                    group.append(piece)
                    size += len(piece)
            out.append(np.concatenate(parts) if parts else np.zeros(0, dtype=dtype))
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

    def to_str(self) -> str:
        return self.backend.to_str()

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json atomically (temp file + os.replace)."""
        path = Path(path)
        atomic_write_text(path, self.backend.to_str(pretty=True))
        self.path = str(path)
        return path

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}:{self.eos_id}, path={self.path!r})"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on ``texts``; id 0 is ``<|endoftext|>``, ids 1-256 the bytes.

    With little text the vocabulary can come out smaller than ``vocab_size`` (no merges left).
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise DataError(
            f"vocab_size={vocab_size}: a byte-level BPE needs at least 258 (256 bytes, {EOS_TOKEN}, one merge)"
        )
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator((p for t in texts for p in _pieces(t)), trainer=trainer)
    return Tokenizer(tok)


_CUT = re.compile(r"(?<=\S)(?=\s)")
# Where no whitespace is near: a boundary between ASCII classes that every GPT-2 pre-token
# ends at (a letter run before a digit or punctuation mark, a digit run before a letter or
# punctuation mark). Punctuation before a letter is not one ("'s" is a pre-token).
_PUNCT = re.escape("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
_CLASS_CUT = re.compile(rf"(?<=[A-Za-z])(?=[0-9{_PUNCT}])|(?<=[0-9])(?=[A-Za-z{_PUNCT}])")
HARD_PIECE = 1 << 18  # 256K chars: BPE on one pre-token costs ~100 bytes per char


def _pieces(text: str, size: int = 1 << 15, hard: int = HARD_PIECE) -> list[str]:
    """``text`` cut into pieces of about ``size`` chars, each cut where whitespace follows a non-space.

    No GPT-2 byte-level pre-token crosses such a point (a pre-token holds no whitespace after
    a non-space), so encoding the pieces gives exactly the ids of the whole: several times
    faster on 100 KB documents, and parallel across pieces.

    No piece is longer than ``hard`` chars (memory stays bounded on text without whitespace):
    past it the cut falls at the last ASCII class boundary (``_CLASS_CUT``, also exact), and
    only in a ``hard``-char run of one class (no real text) at ``hard`` itself, which can
    change the ids next to that cut.
    """
    hard = max(hard, size)
    out, start = [], 0
    while len(text) - start > size:
        m = _CUT.search(text, start + size, start + hard + 1)
        if m is not None:
            cut = m.start()
        elif len(text) - start <= hard:
            break
        else:
            cuts = [c.start() for c in _CLASS_CUT.finditer(text, start + 1, start + hard + 1)]
            cut = cuts[-1] if cuts else start + hard
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def load_tokenizer(path: str | Path, eos_token: str | None = None) -> Tokenizer:
    """Load ``tokenizer.json`` from a corpus directory or from the path of the file itself."""
    from tokenizers import Tokenizer as HFTokenizer

    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer: {p} does not exist (run `peer data prepare` or pass --tokenizer)")
    try:
        backend = HFTokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        try:
            json.loads(p.read_text(encoding="utf-8"))
            why = str(e)
        except (ValueError, UnicodeDecodeError) as je:
            why = f"not valid JSON ({je})"
        raise DataError(f"tokenizer {p}: cannot be loaded: {why}") from None
    return Tokenizer(backend, eos_token=eos_token, path=str(p))
