"""Which expert rows a sparse-memory fine-tuning may change (``train.expert_rows``; issue 29's moonshot).

Following sparse memory fine-tuning (Lin et al., "Continual Learning via Sparse Memory Finetuning",
arXiv:2510.15103), the rows a fine-tuning updates are those its data retrieves far more than the
background does, ranked by TF-IDF of retrievals:

    tf(i)  = router weight expert i receives on the fine-tuning data (first ``batches`` batches, in order)
    idf(i) = ln((1 + B) / (1 + b_i)),  b_i = number of the B background batches that retrieve expert i
    keep   = the ``rows`` experts with the largest tf * idf (per sparse layer)

``train.row_selection = "run"``: measured once, with the model the fine-tuning starts from (eval mode),
and kept in the run folder (``expert_rows.pt``) so that a resumed run trains the same rows.
``"batch"`` (Lin et al.'s own rule, :class:`BatchRows`): ``idf`` is measured once on the background (and
kept in ``expert_idf.pt``), ``tf`` afresh on every training forward (the router weight each expert
receives from that batch), and each batch keeps its own top ``rows`` experts per layer.

A gradient hook on each expert table then drops every other row from its (sparse, row-wise) gradient:
those rows are not touched at all by the row-wise AdamW (no update, no decay). Dropping rows from a
sparse gradient selects by value, which waits for the device on a GPU; this is a fine-tuning mode, not
the pre-training hot path.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from ..layers.router import ProductKeyRouter

__all__ = [
    "retrievals",
    "idf",
    "batch_top_rows",
    "select_rows",
    "background_idf",
    "BatchRows",
    "restrict_gradients",
    "save_rows",
    "load_rows",
    "ROWS_FILE",
    "IDF_FILE",
]

ROWS_FILE = "expert_rows.pt"
IDF_FILE = "expert_idf.pt"


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


def _routers(model) -> dict[str, ProductKeyRouter]:
    return {n: m for n, m in model.sparse_layers().items() if isinstance(m, ProductKeyRouter)}


def retrievals(model, batches: Iterable, device="cpu") -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """{layer name: (router weight per expert summed over ``batches``, how many batches retrieve each expert,
    the number of batches)}, in eval mode, for every product-key layer of ``model``."""
    tf, hits, count = _usage(model, _routers(model), batches, device)
    return {n: (tf[n], hits[n], count) for n in tf}


def idf(hits: torch.Tensor, batches: int) -> torch.Tensor:
    """ln((1 + B) / (1 + b_i)): ``hits`` b_i the number of the ``batches`` B that retrieve expert i."""
    return torch.log((1.0 + batches) / (1.0 + hits))


def batch_top_rows(usage: torch.Tensor, idf: torch.Tensor, rows: int) -> torch.Tensor:
    """One batch's kept rows (Lin et al.'s rule): the ``rows`` experts of largest ``usage * idf`` among those
    the batch retrieved (``usage`` > 0)."""
    return (usage * idf).topk(min(rows, int((usage > 0).sum()))).indices


def background_idf(model, background_batches: Iterable, device="cpu") -> dict[str, torch.Tensor]:
    """{layer name: idf per expert} = ln((1 + B) / (1 + b_i)) over the background batches (module docstring)."""
    _, present, total = _usage(model, _routers(model), background_batches, device)
    return {n: idf(b, total) for n, b in present.items()}


def select_rows(model, data_batches: Iterable, background_batches: Iterable, rows: int, device="cpu") -> dict:
    """{layer name: LongTensor of the ``rows`` kept row ids (ascending)} by TF-IDF (module docstring)."""
    tf, _, _ = _usage(model, _routers(model), data_batches, device)
    idf = background_idf(model, background_batches, device)
    keep = {}
    for n, t in tf.items():
        score = t * idf[n]
        keep[n] = score.topk(min(rows, score.numel())).indices.sort().values
    return keep


def _keep_rows(g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``g`` (a table's gradient, sparse or dense) with every row outside ``mask`` dropped."""
    if g.is_sparse:
        g = g.coalesce()
        sel = mask[g.indices()[0]]
        idx, val = g.indices()[:, sel], g.values()[sel]  # a subset of sorted unique rows: still coalesced
        return torch.sparse_coo_tensor(idx, val, g.shape, is_coalesced=True, check_invariants=False)
    return g * mask[:, None].to(g.dtype)


def restrict_gradients(model, keep: dict) -> list:
    """Hooks on each expert table of the layers in ``keep``: the gradient keeps only those rows. Returns
    the hook handles."""
    handles = []
    for name, rows in keep.items():
        layer = model.get_submodule(name)
        for p in layer.expert_parameters():
            mask = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
            mask[rows.to(p.device)] = True
            handles.append(p.register_hook(lambda g, mask=mask: _keep_rows(g, mask)))
    return handles


class BatchRows:
    """Per-batch row selection (``train.row_selection = "batch"``): every training forward of each layer
    keeps the ``rows`` experts with the largest ``tf * idf``, ``tf`` the router weight each expert got
    from that forward; the tables' gradient hooks (the backward of that same forward) keep only those.
    Experts the batch did not retrieve are never kept. ``close()`` removes the hooks."""

    def __init__(self, model, idf: dict[str, torch.Tensor], rows: int) -> None:
        self.rows, self.masks, self.handles = rows, {}, []
        self.layers = list(_routers(model).values())
        for name, layer in _routers(model).items():
            w = idf[name].to(layer.index.keys.device)
            layer.record_usage = True
            layer.reset_usage()
            self.handles.append(layer.register_forward_hook(lambda m, i, o, name=name, w=w: self._select(m, name, w)))
            for p in layer.expert_parameters():
                self.handles.append(p.register_hook(lambda g, name=name: _keep_rows(g, self.masks[name])))

    def _select(self, layer: ProductKeyRouter, name: str, weight: torch.Tensor) -> None:
        if layer.training and torch.is_grad_enabled():  # a training forward (a backward will follow)
            with torch.no_grad():
                mask = torch.zeros(layer.usage.numel(), dtype=torch.bool, device=layer.usage.device)
                mask[batch_top_rows(layer.usage, weight, self.rows)] = True
                self.masks[name] = mask
        layer.reset_usage()  # each forward counts only its own batch

    def close(self) -> None:
        """Remove the hooks and stop the usage recording they needed."""
        for h in self.handles:
            h.remove()
        for layer in self.layers:
            layer.record_usage = False
            layer.reset_usage()
        self.handles, self.layers = [], []


def save_rows(run_dir: Path, keep: dict, file: str = ROWS_FILE) -> None:
    """``keep`` (the kept rows, or for ``row_selection="batch"`` the idf, :data:`IDF_FILE`) in the run folder
    (written to a temp file, then renamed)."""
    tmp = run_dir / f".{file}.tmp"
    torch.save({n: r.cpu() for n, r in keep.items()}, tmp)
    tmp.replace(run_dir / file)


def load_rows(run_dir: Path, file: str = ROWS_FILE) -> dict | None:
    """What :func:`save_rows` kept when the run started; None when it has none."""
    path = run_dir / file
    return torch.load(path) if path.is_file() else None
