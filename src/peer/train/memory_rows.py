"""Which expert rows a sparse-memory fine-tuning may change (``train.expert_rows``; issue 29's moonshot).

Following sparse memory fine-tuning (Lin et al., "Continual Learning via Sparse Memory Finetuning",
arXiv:2510.15103), the rows a fine-tuning updates are those its data retrieves far more than the
background does, ranked by TF-IDF of retrievals:

    tf(i)  = router weight expert i receives on the fine-tuning data (first ``batches`` batches, in order)
    idf(i) = ln((1 + B) / (1 + b_i)),  b_i = number of the B background batches that retrieve expert i
    keep   = the ``rows`` experts with the largest tf * idf (per sparse layer)

Measured once, with the model the fine-tuning starts from (eval mode), and kept in the run folder
(``expert_rows.pt``) so that a resumed run trains the same rows. A gradient hook on each expert table
then drops every other row from its (sparse, row-wise) gradient: those rows are not touched at all by
the row-wise AdamW (no update, no decay). Dropping rows from a sparse gradient selects by value, which
waits for the device on a GPU; this is a fine-tuning mode, not the pre-training hot path.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from ..layers.router import ProductKeyRouter

__all__ = ["select_rows", "restrict_gradients", "save_rows", "load_rows", "ROWS_FILE"]

ROWS_FILE = "expert_rows.pt"


@torch.no_grad()
def _usage(model, layers: dict[str, ProductKeyRouter], batches: Iterable, device):
    """Per layer: router weight per expert summed over ``batches``, how many batches retrieve it, the batch count."""
    was = model.training
    model.eval()
    for m in layers.values():
        m.record_usage = True
        m.reset_usage()
    tf = {n: torch.zeros(m.index.num_keys, dtype=torch.float64) for n, m in layers.items()}
    hits = {n: torch.zeros(m.index.num_keys, dtype=torch.float64) for n, m in layers.items()}
    count = 0
    try:
        for x, _ in batches:
            model(x.to(device))
            count += 1
            for n, m in layers.items():
                u = m.usage.detach().cpu()
                tf[n] += u
                hits[n] += (u > 0).double()
                m.reset_usage()
    finally:
        for m in layers.values():
            m.record_usage = False
            m.reset_usage()
        model.train(was)
    return tf, hits, count


def select_rows(model, data_batches: Iterable, background_batches: Iterable, rows: int, device="cpu") -> dict:
    """{layer name: LongTensor of the ``rows`` kept row ids (ascending)} by TF-IDF (module docstring)."""
    layers = {n: m for n, m in model.sparse_layers().items() if isinstance(m, ProductKeyRouter)}
    tf, _, _ = _usage(model, layers, data_batches, device)
    _, present, total = _usage(model, layers, background_batches, device)
    keep = {}
    for n in layers:
        idf = torch.log((1.0 + total) / (1.0 + present[n]))
        score = tf[n] * idf
        k = min(rows, score.numel())
        keep[n] = score.topk(k).indices.sort().values
    return keep


def restrict_gradients(model, keep: dict) -> list:
    """Hooks on each expert table of the layers in ``keep``: the gradient keeps only those rows. Returns
    the hook handles."""
    handles = []
    for name, rows in keep.items():
        layer = model.get_submodule(name)
        for p in layer.expert_parameters():
            mask = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
            mask[rows.to(p.device)] = True

            def hook(g: torch.Tensor, mask: torch.Tensor = mask) -> torch.Tensor:
                if g.is_sparse:
                    g = g.coalesce()
                    sel = mask[g.indices()[0]]
                    idx, val = g.indices()[:, sel], g.values()[sel]  # a subset of sorted unique rows: still coalesced
                    return torch.sparse_coo_tensor(idx, val, g.shape, is_coalesced=True, check_invariants=False)
                return g * mask[:, None].to(g.dtype)

            handles.append(p.register_hook(hook))
    return handles


def save_rows(run_dir: Path, keep: dict) -> None:
    """``keep`` in the run folder (written to a temp file, then renamed)."""
    tmp = run_dir / f".{ROWS_FILE}.tmp"
    torch.save({n: r.cpu() for n, r in keep.items()}, tmp)
    tmp.replace(run_dir / ROWS_FILE)


def load_rows(run_dir: Path) -> dict | None:
    """The rows a run trains, saved when it started; None when it has none."""
    path = run_dir / ROWS_FILE
    return torch.load(path) if path.is_file() else None
