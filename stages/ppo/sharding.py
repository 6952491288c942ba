"""When PPO shards its frozen base across ranks, and how much of it each rank holds.

    shard = sharding_wanted(cfg, world_size, profile)   # before the run folder is touched (may raise ConfigError)
    build_stack(..., shard=shard)                      # the base loaded already sharded (pipeline.sharding)

The engine is every stage's (pipeline/sharding.py): `load_base(..., shard=True)` keeps on each rank only its shard of
each weight as it reads them (`from_pretrained(distributed_config=...)`), so no rank holds the whole base on its
device (what that saves and does not on the CPU: `make bench-shard`). Each decoder layer, the embeddings, the final norm and the LM head are one FSDP unit each: a
forward through the causal LM, a direct call of the trunk (`backbone(lm)(...)` for values and rewards) and
TopLayers' replay of single decoder layers all gather exactly the weights they use. The LoRA adapters and the
scalar heads (added after the load) stay whole on every rank: they are <1% of the weights, so the update path is
the data-parallel one unchanged (the loss over the global token count, gradients summed with one all-reduce, ranks
bit-identical, the same checkpoint format), and sharded PPO gives the same numbers as DDP.

Lockstep: a unit's all-gather is a collective, so every rank must run the same forwards. The chunk and micro-batch
counts are equal on every rank by construction (same local batch); the sampling loop's early exit is a global
decision (`pipeline.sharding.on_every_rank`).
"""

from __future__ import annotations

import sys

import torch

from pipeline import sharding
from pipeline.adapters import adapter_of
from pipeline.config import ConfigError


def sharding_wanted(cfg, world_size: int, profile) -> bool:
    """Decide from `shard_base` (auto | true | false) and the launch (an FSDP accelerate config: `requested`);
    refuse what cannot be sharded."""
    wanted = cfg.shard_base == "true" or (cfg.shard_base == "auto" and sharding.requested())
    if not wanted:
        return False
    if world_size < 2:
        print("note: one process: the base is not sharded (shard_base needs 2+ processes)", file=sys.stderr)
        return False
    if profile.load_in_4bit:
        raise ConfigError("sharding the base (FSDP config or shard_base: true) cannot be combined with load_in_4bit: "
                          "FSDP2 does not shard bitsandbytes 4-bit weights; set load_in_4bit: false in the model "
                          "profile, or --shard_base false to keep a whole 4-bit base on every rank")
    return True


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """What this rank holds of `t`: a DTensor's local shard, or the whole tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def base_numel(stack) -> tuple[int, int, int]:
    """(elements of the frozen base, of which on this rank, elements of the storage behind those: the memory this
    rank holds; a shard that is a view of a whole weight holds the whole) with the adapters' own tensors excluded."""
    base = [p for n, p in stack.model.named_parameters() if adapter_of(n) is None]
    held = [local_tensor(p) for p in base]
    return (sum(p.numel() for p in base), sum(t.numel() for t in held),
            sum(t.untyped_storage().nbytes() // t.element_size() for t in held))


__all__ = ["base_numel", "local_tensor", "sharding_wanted"]
