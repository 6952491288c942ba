"""Sharding PPO's frozen base across ranks with torch FSDP2 (`torch.distributed.fsdp.fully_shard`).

    shard = sharding_wanted(cfg, world_size, profile)   # before the run folder is touched (may raise ConfigError)
    shard_base(stack, device)                          # after the adapters are loaded, before the trainer is built

Only the frozen base is sharded: every rank keeps ~1/world of each decoder layer, the embeddings, the final norm and
the LM head, and all-gathers a module's weights just for its forward (and again for the backward through it). The
LoRA adapters and the scalar heads stay whole on every rank (`ignored_params`): they are <1% of the weights, so the
update path is the data-parallel one unchanged (the loss over the global token count, gradients summed with one
all-reduce, ranks bit-identical, the same checkpoint format), and sharded PPO gives the same numbers as DDP.

Each module that PPO calls directly gets its own FSDP unit: the trunk (`backbone(lm)(...)` for values and rewards),
the scalar head (`lm.score`), the decoder layers (TopLayers captures and replays them), plus the embeddings, the
final norm and the LM head; the causal LM is the root (the first forward goes through it: the sampling loop's).
A module called outside every unit that holds its weights would see sharded DTensors (STACK-NOTES 8).

Lockstep: a unit's all-gather is a collective, so every rank must run the same forwards. The chunk and micro-batch
counts are equal on every rank by construction (same local batch); the sampling loop's early exit is a global
decision (`every_rank`).
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

from pipeline.adapters import adapter_of
from pipeline.config import ConfigError
from pipeline.models import backbone


def fsdp_launch() -> bool:
    """The accelerate config asked for FSDP: `accelerate launch --config_file configs/accelerate/fsdp.yaml` sets this,
    also on CPU, where accelerate itself then runs plain DDP (STACK-NOTES 8)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def sharding_wanted(cfg, world_size: int, profile) -> bool:
    """Decide from `shard_base` (auto | true | false) and the launch; refuse what cannot be sharded."""
    wanted = cfg.shard_base == "true" or (cfg.shard_base == "auto" and fsdp_launch())
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


def every_rank(flag: bool, device) -> bool:
    """True when `flag` is true on every rank (one all-reduce)."""
    import torch.distributed as dist

    t = torch.tensor([0 if flag else 1], device=device)
    dist.all_reduce(t)
    return int(t.item()) == 0


def _units(lm: nn.Module) -> list[list[nn.Module]]:
    """The modules that get their own FSDP unit, in forward order; modules sharing a weight (tied embeddings) share
    one unit, since a parameter can belong to one unit only."""
    from .rollout import decoder_layers

    body, layers = backbone(lm), decoder_layers(lm)
    units: list[list[nn.Module]] = []
    for child in body.children():
        if child is layers:
            units += [[layer] for layer in layers]
        elif any(True for _ in child.parameters()):
            units.append([child])
    for child in lm.children():
        if child is not body and any(True for _ in child.parameters()):
            units.append([child])
    # Tied weights: merge the units that hold the same tensor (GPT-2's wte / lm_head).
    merged: list[list[nn.Module]] = []
    owner: dict[int, list[nn.Module]] = {}
    for unit in units:
        ids = {id(p) for m in unit for p in m.parameters()}
        shared = next((owner[i] for i in ids if i in owner), None)
        if shared is None:
            merged.append(unit)
            shared = unit
        else:
            shared.extend(unit)
        for i in ids:
            owner[i] = shared
    return merged


def shard_base(stack, device: torch.device) -> None:
    """fully_shard the frozen base of `stack` over all ranks; adapters and heads stay whole (and go to `device`)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    lm = stack.causal_lm
    adapters = {p for n, p in stack.model.named_parameters() if adapter_of(n) is not None}
    if any(p.device.type == "meta" for p in lm.parameters()):
        raise ConfigError("the base has weights on the meta device (fsdp_cpu_ram_efficient_loading left them "
                          "unloaded on this rank): set fsdp_cpu_ram_efficient_loading: false in the accelerate config")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for unit in _units(lm):
        fully_shard(unit if len(unit) > 1 else unit[0], mesh=mesh, reshard_after_forward=True, ignored_params=adapters)
    fully_shard(lm, mesh=mesh, reshard_after_forward=True, ignored_params=adapters)
    with torch.no_grad():  # FSDP moved the shards; the ignored adapter tensors move here
        for p in adapters:
            p.data = p.data.to(device)
    stack.sharded = True


def local_numel(t: torch.Tensor) -> int:
    """Elements this rank holds: a DTensor's local shard, or the whole tensor."""
    return t.to_local().numel() if hasattr(t, "to_local") else t.numel()


def base_numel(stack) -> tuple[int, int]:
    """(elements of the frozen base, of which on this rank): the adapters' own tensors excluded."""
    base = [p for n, p in stack.model.named_parameters() if adapter_of(n) is None]
    return sum(p.numel() for p in base), sum(local_numel(p) for p in base)


__all__ = ["base_numel", "every_rank", "fsdp_launch", "local_numel", "shard_base", "sharding_wanted"]
