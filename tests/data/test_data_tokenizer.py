"""Tokenizer: exact round trip, EOS id, piecewise encoding equals whole encoding, loading errors."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.data import EOS_TOKEN, DataError, load_tokenizer, train_tokenizer
from peer.data.tokenizer import _pieces

VARIED = [
    "Hello, world!",
    "  leading and trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nand\r\nCRLF",
    "unicode: héllo wörld — naïve café ✓ Ω≈ç√ 日本語のテキスト 한국어 العربية",
    "emoji 😀🎉👩‍👩‍👧 and combining e\u0301 and zero\u200bwidth",
    "code: def f(x):\n    return x ** 2  # comment\n",
    "control \x00\x01\x7f bytes and \ufeff BOM",
    "",
    " ",
    EOS_TOKEN + " inside text",
]


@pytest.mark.parametrize("text", VARIED)
def test_round_trip(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text)
    assert tiny_tokenizer.decode(ids) == text
    assert all(0 <= i < tiny_tokenizer.vocab_size for i in ids)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_round_trip_any_string(tiny_tokenizer, text):
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text


def test_vocab_and_eos(tiny_tokenizer):
    assert tiny_tokenizer.vocab_size == 300
    assert tiny_tokenizer.eos_token == EOS_TOKEN and tiny_tokenizer.eos_id == 0
    assert tiny_tokenizer.encode(EOS_TOKEN) == [0]
    # merges were learned: common words are single tokens, so text compresses below 1 token/byte
    text = " the of and to"
    assert len(tiny_tokenizer.encode(text)) < len(text.encode())


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab \n\t.,é日😀")), max_size=300), st.integers(1, 40))
def test_pieces_encode_exactly_like_the_whole(tiny_tokenizer, text, size):
    pieces = _pieces(text, size)
    assert "".join(pieces) == text
    joined = [i for p in pieces for i in tiny_tokenizer.encode(p)]
    assert joined == tiny_tokenizer.encode(text)


def test_encode_batch_matches_encode(tiny_tokenizer):
    from data_fakes import fake_text

    long = "\n\n".join(fake_text(i, 3000) for i in range(6))  # > 32K chars: encoded in pieces
    texts = [long, "short one", ""]
    assert tiny_tokenizer._piecewise
    assert tiny_tokenizer.encode_batch(texts) == [tiny_tokenizer.encode(t) for t in texts]


def test_save_and_load(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(tmp_path / "tokenizer.json")
    for where in (tmp_path, tmp_path / "tokenizer.json", str(tmp_path)):
        tok = load_tokenizer(where)
        assert tok.vocab_size == 300 and tok.eos_id == tiny_tokenizer.eos_id
        assert tok.encode(VARIED[3]) == tiny_tokenizer.encode(VARIED[3])
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temp files left


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json.*not valid JSON"):
        load_tokenizer(bad)


def test_user_tokenizer_eos(tmp_path):
    """A tokenizer without <|endoftext|>: its </s> is found; without any EOS it is an error."""
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers

    vocab = {"<unk>": 0, "a": 1, "b": 2, "</s>": 3}
    hf = HF(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "wl.json"))
    tok = load_tokenizer(tmp_path / "wl.json")
    assert tok.eos_token == "</s>" and tok.eos_id == 3 and tok.vocab_size == 4
    assert not tok._piecewise  # not byte-level: always encoded whole
    del vocab["</s>"]
    HF(models.WordLevel(vocab, unk_token="<unk>")).save(str(tmp_path / "noeos.json"))
    with pytest.raises(DataError, match="noeos.json: no end-of-document token"):
        load_tokenizer(tmp_path / "noeos.json")
    assert load_tokenizer(tmp_path / "noeos.json", eos_token="b").eos_id == 2


def test_vocab_too_small():
    with pytest.raises(DataError, match="vocab_size=100"):
        train_tokenizer(["abc"], vocab_size=100)


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab1'.,_é日 ")), max_size=400), st.integers(1, 10), st.integers(1, 30))
def test_pieces_without_whitespace_stay_bounded_and_exact(tiny_tokenizer, text, size, hard):
    """Past ``hard`` chars without whitespace, cuts fall at class boundaries, still exact."""
    text = text.replace(" ", "") + "ab1,.x9"  # mostly whitespace-free, with class boundaries
    pieces = _pieces(text, size, hard)
    assert "".join(pieces) == text
    assert all(len(p) <= max(hard, size) for p in pieces)
    assert [i for p in pieces for i in tiny_tokenizer.encode(p)] == tiny_tokenizer.encode(text)


def test_pieces_of_one_huge_word_are_bounded():
    """A 2M-char text with no whitespace and no class boundary is cut anyway (memory bound)."""
    from peer.data.tokenizer import HARD_PIECE

    pieces = _pieces("x" * (2 << 20))
    assert len(pieces) == 8 and max(map(len, pieces)) == HARD_PIECE
    assert len(_pieces("ab1" * 1_000_000)) >= 3_000_000 // HARD_PIECE


def test_encode_arrays_equals_encode_in_small_groups(tiny_tokenizer):
    """Grouped encoding (bounded memory) gives the same ids, as arrays of the asked dtype."""
    import numpy as np
    from data_fakes import fake_text

    texts = ["\n\n".join(fake_text(i, 3000) for i in range(4)), "", "x" * 70_000, "short"]
    arrays = tiny_tokenizer.encode_arrays(texts, np.uint16, group_chars=1000)
    assert [a.dtype for a in arrays] == [np.uint16] * 4
    assert [a.tolist() for a in arrays] == [tiny_tokenizer.encode(t) for t in texts[:2]] + [
        [i for p in _pieces(texts[2]) for i in tiny_tokenizer.encode(p)],
        tiny_tokenizer.encode("short"),
    ]
