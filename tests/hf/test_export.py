"""``peer export RUN DIR``: a ``peer train`` checkpoint as a transformers model + tokenizer with the same logits."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import peer.hf  # noqa: F401
import peer.train as train_mod
from peer.cli import main as cli_main
from peer.hf import PeerForCausalLM, export_run

TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "All that glitters is not gold; fortune favours the bold, and the early bird catches the worm. "
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real (tiny) ``peer train`` run on a tiny corpus: byte-level BPE tokenizer, PEER middle block."""
    from peer.config import config_from_dict
    from peer.data.corpus import write_corpus
    from peer.data.sources import Document
    from peer.data.tokenizer import train_tokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("export")
    docs = [Document(id=f"t/{i}", text=TEXT * (1 + i % 3) + f" Document {i}.") for i in range(24)]
    tok = train_tokenizer([d.text for d in docs], vocab_size=300)
    write_corpus(root / "corpus", {"train": docs[:20], "val": docs[20:]}, tok, {}, log=lambda s: None)
    cfg = config_from_dict(
        {
            "model": {
                "vocab_size": 320,
                "d_model": 32,
                "n_layers": 2,
                "n_heads": 2,
                "max_seq_len": 32,
                "sparse_layer": "peer",
                "peer": {"num_experts": 64, "heads": 2, "topk": 4, "key_dim": 8},
            },
            "data": {"corpus": str(root / "corpus")},
            "train": {
                "out_dir": str(root / "run"),
                "steps": 3,
                "batch_size": 4,
                "seq_len": 16,
                "log_every": 1,
                "ckpt_every": 3,
                "progress": False,
                "tensorboard": False,
            },
            "optim": {"warmup_steps": 1},
        }
    )
    try:
        run = train_mod.train(cfg)
    finally:
        torch.set_num_threads(threads)
    return run, tok


def test_exported_logits_equal_the_trained_model(run_dir, tmp_path):
    run, tok = run_dir
    out = export_run(run, tmp_path / "hf")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.tmp")]  # temp dir moved into place

    lm, cfg, meta = train_mod.load_run(run)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model) is PeerForCausalLM and not model.training
    x = torch.randint(0, 300, (3, 20))
    with torch.no_grad():
        assert torch.equal(model(x).logits, lm(x).logits)
    # the trained weights, not a fresh init: BatchNorm statistics and tables equal the checkpoint's
    sd = lm.state_dict()
    assert all(torch.equal(v, sd[k.removeprefix("model.")]) for k, v in model.state_dict().items())
    assert model.config.eos_token_id == tok.eos_id
    assert model.config.peer_source["step"] == meta["step"] == 3


def test_exported_tokenizer_loads_with_autotokenizer(run_dir, tmp_path):
    run, tok = run_dir
    out = export_run(run, tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert isinstance(hf_tok, PreTrainedTokenizerFast)
    text = "The lazy fox saves nine stitches. Ünïcödé too!"
    ids = hf_tok(text)["input_ids"]
    assert ids == tok.encode(text)
    assert hf_tok.decode(ids) == text
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == tok.eos_id == hf_tok.pad_token_id
    # end to end: tokenize, generate, decode
    model = AutoModelForCausalLM.from_pretrained(out)
    enc = hf_tok("The quick", return_tensors="pt")
    gen = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] <= enc["input_ids"].shape[1] + 5
    assert isinstance(hf_tok.decode(gen[0]), str)


def test_cli_export_and_existing_dir(run_dir, tmp_path, capsys):
    run, _ = run_dir
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    assert cli_main(["export", str(ckpt), str(tmp_path / "a"), "--no-tokenizer"]) == 0
    assert (tmp_path / "a" / "model.safetensors").is_file() and not (tmp_path / "a" / "tokenizer.json").exists()
    assert cli_main(["export", str(run), str(tmp_path / "a")]) == 2
    assert "previous export" in capsys.readouterr().err
    assert cli_main(["export", str(run), str(tmp_path / "a"), "--overwrite"]) == 0
    assert (tmp_path / "a" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "a" / "config.json").read_text())["model_type"] == "peer"
    assert cli_main(["export", str(tmp_path / "nope"), str(tmp_path / "b")]) == 2


def _tree(path):
    return sorted(
        (str(p.relative_to(path)), p.read_bytes() if p.is_file() else b"")
        for p in path.rglob("*")
        if p.name != ".peer.lock"
    )


def test_export_never_deletes_a_run_or_a_corpus(run_dir, tmp_path, capsys):
    """`peer export RUN RUN --overwrite` (and into a folder holding a run, a corpus or other files) refuses
    and leaves everything as it was; --overwrite replaces only a previous export."""
    import shutil

    run, _ = run_dir
    before = _tree(run)
    for target in (run, run.parent):  # the run itself, a folder that holds it
        assert cli_main(["export", str(run), str(target), "--overwrite"]) == 2
        assert "holds it" in capsys.readouterr().err
    assert _tree(run) == before
    other_run = tmp_path / "other_run"
    shutil.copytree(run, other_run)
    corpus = tmp_path / "corpus"
    (corpus / "splits").mkdir(parents=True)
    (corpus / "manifest.json").write_text("{}")
    misc = tmp_path / "misc"
    misc.mkdir()
    (misc / "notes.txt").write_text("mine")
    for target, what in ((other_run, "a training run"), (corpus, "a corpus"), (misc, "peer export did not write")):
        snap = _tree(target)
        assert cli_main(["export", str(run), str(target), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert what in err and err.count("\n") == 1, err
        assert _tree(target) == snap
    # an export with a user's file added is not an export any more
    exp = tmp_path / "exp"
    assert cli_main(["export", str(run), str(exp)]) == 0
    (exp / "README.md").write_text("model card")
    assert cli_main(["export", str(run), str(exp), "--overwrite"]) == 2
    assert (exp / "README.md").read_text() == "model card"


def test_export_files_follow_the_umask(run_dir, tmp_path):
    import os
    import stat

    run, _ = run_dir
    old = os.umask(0o022)
    try:
        out = export_run(run, tmp_path / "shared")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for f in out.iterdir():
        if f.name != ".peer.lock":
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_export_on_a_full_disk_leaves_nothing_behind(run_dir, tmp_path, monkeypatch, capsys):
    def full(self, *a, **k):
        raise Exception(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(PeerForCausalLM, "save_pretrained", full)
    run, _ = run_dir
    assert cli_main(["export", str(run), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no space left on the device of" in err and "the export" in err
    assert list(tmp_path.iterdir()) == []  # neither DIR nor its temp folder


def test_an_export_loads_with_trust_remote_code_in_a_process_that_never_imported_peer_hf(run_dir, tmp_path):
    import os
    import subprocess
    import sys

    run, _ = run_dir
    out = export_run(run, tmp_path / "hf")
    lm, _, _ = train_mod.load_run(run)
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        torch.save({"x": x, "logits": lm(x).logits}, tmp_path / "ref.pt")
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
ref = torch.load({str(tmp_path / "ref.pt")!r})
with torch.no_grad():
    assert torch.equal(model(ref["x"]).logits, ref["logits"])
print(type(model).__name__)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "PeerForCausalLM"
    # without trust_remote_code (and without import peer.hf) transformers refuses it, saying why
    code2 = f"from transformers import AutoModelForCausalLM\nAutoModelForCausalLM.from_pretrained({str(out)!r})"
    done = subprocess.run([sys.executable, "-c", code2], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0 and "trust_remote_code" in done.stderr
    # the shims are part of what an export writes: a second export may replace the first
    assert export_run(run, out, overwrite=True) == out
