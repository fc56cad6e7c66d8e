"""A tiny ModelConfig for model and FLOP tests (reference backend, small PEER / PKM / MoE)."""

from peer.config import ModelConfig


def tiny_model_config(
    vocab: int, max_seq_len: int, pkm: tuple[int, int, int, int], sparse_layer: str = "none", **kw
) -> ModelConfig:
    """3 blocks of d_model 32; ``pkm`` = (num_memories, heads, topk, key_dim); ``kw``: overrides,
    nested with ``__`` (``peer__topk=2``)."""
    cfg = ModelConfig(
        vocab_size=vocab, d_model=32, n_layers=3, n_heads=4, max_seq_len=max_seq_len, sparse_layer=sparse_layer
    )
    cfg.peer.num_experts, cfg.peer.heads, cfg.peer.topk, cfg.peer.key_dim = 64, 2, 4, 8
    cfg.peer.backend = "reference"
    cfg.pkm.num_memories, cfg.pkm.heads, cfg.pkm.topk, cfg.pkm.key_dim = pkm
    cfg.moe.num_experts = 4
    for key, value in kw.items():
        obj = cfg
        *path, last = key.split("__")
        for p in path:
            obj = getattr(obj, p)
        setattr(obj, last, value)
    return cfg
