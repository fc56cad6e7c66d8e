"""Scale-out on torch.distributed: process-group set-up, expert-sharded PEER, data parallelism, DCP.

- :mod:`.env`: ``init_distributed`` / ``teardown`` under ``torchrun``, backend choice, timeouts.
- :mod:`.expert_parallel`: PEER with its expert tables split by rows across ranks.
- :mod:`.data_parallel`: what the training loop calls: global-batch split, DDP / FSDP2 wrapping,
  global-norm clipping over shards, metrics and expert usage over ranks, failure messages.
- :mod:`.checkpoint`: torch.distributed.checkpoint save / load on any number of ranks, full export.

See docs/distributed.md for launching and the communication volume per token.
"""

from .env import (
    DistEnv,
    DistributedError,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    current_env,
    get_rank,
    get_world_size,
    init_distributed,
    is_distributed,
    teardown,
)
from .expert_parallel import (
    ExpertShardedPEER,
    comm_floats_per_token,
    expert_shards,
    gather_full_state,
    shard_bounds,
    shard_model,
    shard_peer_layer,
    sharded_expert_mix,
    unshard_peer_layer,
)

__all__ = [
    "DistEnv",
    "DistributedError",
    "init_distributed",
    "teardown",
    "current_env",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "ExpertShardedPEER",
    "shard_peer_layer",
    "shard_model",
    "shard_bounds",
    "sharded_expert_mix",
    "gather_full_state",
    "unshard_peer_layer",
    "expert_shards",
    "comm_floats_per_token",
]
