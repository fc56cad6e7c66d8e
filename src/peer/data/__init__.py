"""Data: the starter corpus (sources, splits, manifest), the tokenizer, memmapped tokens, batching.

    peer data prepare                          # data/starter: train, val, eval_* + tokenizer.json
    tokens = open_tokens("data/starter", "train")
    batcher = Batcher(tokens, batch_size=8, seq_len=512, seed=0, rank=0, world_size=1)
    x, y = batcher.next()                      # int64 [8, 512]; y is x shifted by one
    for name in eval_splits("data/starter"):   # val, eval_brown_fiction, ...
        for x, y in eval_batches(open_tokens("data/starter", name), 8, 512): ...

See docs/data.md for the corpus, its splits and the on-disk format.
"""

from .batcher import Batcher, EvalBatches, eval_batches, num_windows
from .corpus import check_disjoint, corpus_is_complete, load_manifest, prepare
from .sources import DEFAULT_SOURCES, SOURCES, DataError, Document, Source
from .tokenizer import EOS_TOKEN, Tokenizer, load_tokenizer, train_tokenizer
from .tokens import eval_splits, list_splits, open_tokens, split_info, token_dtype
from .userdata import build_corpus, encode_texts, read_documents

__all__ = [
    "Batcher",
    "EvalBatches",
    "eval_batches",
    "num_windows",
    "prepare",
    "check_disjoint",
    "corpus_is_complete",
    "load_manifest",
    "DataError",
    "Document",
    "Source",
    "SOURCES",
    "DEFAULT_SOURCES",
    "EOS_TOKEN",
    "Tokenizer",
    "load_tokenizer",
    "train_tokenizer",
    "open_tokens",
    "list_splits",
    "eval_splits",
    "split_info",
    "token_dtype",
    "encode_texts",
    "read_documents",
    "build_corpus",
]
