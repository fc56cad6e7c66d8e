"""PeerForCausalLM trains with transformers.Trainer; the loss it optimises includes the auxiliary losses."""

import pytest
import torch
from transformers import Trainer, TrainingArguments

pytest.importorskip("accelerate")  # transformers.Trainer needs it (pip install "peer-experts[hf]")

from peer.hf import PeerConfig, PeerForCausalLM

V = 32


class Repeats(torch.utils.data.Dataset):
    """Sequences that repeat a random 4-token pattern: learnable in a few steps."""

    def __init__(self, n=64, seq=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        pats = torch.randint(0, V, (n, 4), generator=g)
        self.ids = pats.repeat(1, seq // 4)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.mark.parametrize("layer", ["peer", "moe"])
def test_trainer_runs_and_loss_decreases(tmp_path, layer):
    torch.manual_seed(0)
    cfg = PeerConfig(
        vocab_size=V,
        d_model=32,
        n_layers=2,
        n_heads=2,
        max_seq_len=32,
        sparse_layer=layer,
        peer={"num_experts": 64, "heads": 2, "topk": 4, "key_dim": 8},
        moe={"num_experts": 4, "routing": "token_choice", "topk": 1, "aux_loss_weight": 1.0},
    )
    model = PeerForCausalLM(cfg)
    data = Repeats()
    batch = {k: torch.stack([data[i][k] for i in range(16)]) for k in ("input_ids", "labels")}
    model.eval()
    with torch.no_grad():
        start = model(**batch)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}

    seen = []

    class Recording(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kw):
            loss, out = super().compute_loss(model, inputs, return_outputs=True, **kw)
            seen.append((float(loss), float(out.aux_loss)))
            return (loss, out) if return_outputs else loss

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=30,
        per_device_train_batch_size=16,
        learning_rate=1e-2,
        warmup_steps=0,
        lr_scheduler_type="constant",
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=10,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    Recording(model=model, args=args, train_dataset=data).train()

    assert len(seen) == 30 and all(torch.isfinite(torch.tensor(s)).all() for s in seen)
    changed = [k for k, v in model.named_parameters() if not torch.equal(v, before[k])]
    sparse = "model.blocks.1.ffn."
    assert any(k.startswith(sparse) for k in changed) and any(not k.startswith(sparse) for k in changed)
    model.eval()
    with torch.no_grad():
        end = model(**batch)
    assert float(end.loss) < float(start.loss) - 0.5
    if layer == "moe":
        # Trainer optimised CE + aux: the aux loss is part of the returned loss and nonzero
        assert all(aux > 0 for _, aux in seen)
        assert all(loss > aux for loss, aux in seen)
