"""FSDP2 (torch's `fully_shard`): the one sharding engine of every stage, on GPUs and on CPU (gloo) alike.

    accelerate launch --config_file configs/accelerate/fsdp.yaml -m stages.sft ...      # GPUs
    ACCELERATE_USE_CPU=1 accelerate launch --config_file configs/accelerate/fsdp_cpu2.yaml -m stages.sft ...

Why not accelerate's own FSDP: on CPU accelerate 1.15 never builds it (state.py turns MULTI_GPU-like types into FSDP,
never MULTI_CPU, so `fsdp_plugin` stays None and the model silently runs as DDP), and on GPUs its SHARDED_STATE_DICT
saves LoRA adapters without weights. So the stages shard the frozen base themselves, when the model is loaded:
transformers' `from_pretrained(distributed_config=DistributedConfig(fsdp_size=N, fsdp_plan=...))` gives each rank
only its shard of every weight, and the Trainer knows such a model (no DDP around it, LoRA gradients averaged over
ranks). `take_over_from_accelerate()` switches accelerate's FSDP off, so that nothing wraps or shards the model twice.

The FSDP units (`fsdp_units`): every decoder layer, every other parameter-holding child of the trunk (embeddings,
final norm) and the head each form one unit; the root keeps no parameter of its own. So a forward through the whole
model and a direct call of the trunk (the reward and value heads read `backbone(model)(...)`) both gather exactly
the weights they use. Collectives: every rank must run the same forwards in the same order; `pipeline.generation`
keeps generation in lockstep.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from pipeline.config import ConfigError

FREE = "free_full_weight"  # gathered for the forward, freed after it (and gathered again for the backward)
KEEP = "keep_full_weight"  # the head: kept gathered between forward and backward (used right at the loss)


def requested() -> bool:
    """Did the accelerate config ask for FSDP (`distributed_type: FSDP`, which `accelerate launch` passes on as
    ACCELERATE_USE_FSDP=true)? `take_over_from_accelerate` records it, since it switches the variable off."""
    return os.environ.get("PIPELINE_FSDP", os.environ.get("ACCELERATE_USE_FSDP", "false")).lower() == "true"


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def take_over_from_accelerate() -> bool:
    """Call first thing in a stage's main(), before any model is loaded or Trainer built. Returns whether this run
    shards its base. Refuses configurations the engine does not run, with one clear error each."""
    if not requested():
        return False
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ConfigError(f"the accelerate config asks for FSDP version {version}: the pipeline shards with FSDP2 "
                          f"only: set `fsdp_version: 2` under fsdp_config (configs/accelerate/fsdp.yaml does)")
    # From here on this module shards; accelerate must not: no FSDP plugin in the Trainer's Accelerator (it would save
    # through its own state-dict path), and no rank>0 loading onto the meta device (FSDP_CPU_RAM_EFFICIENT_LOADING,
    # read by transformers only while ACCELERATE_USE_FSDP is true: it left a fresh score head on meta on rank 1).
    os.environ["PIPELINE_FSDP"] = "true"
    os.environ["ACCELERATE_USE_FSDP"] = "false"
    return world_size() > 1


# ---------------------------------------------------------------------------------------------------- the units

def _trunk_prefix(model: nn.Module) -> tuple[str, nn.Module]:
    """(dotted name, module) of the transformer trunk (`model`, `transformer`, `gpt_neox`) under a task model,
    also under a peft wrapper."""
    from transformers import PreTrainedModel

    for name, module in model.named_modules():  # the task model (LlamaForCausalLM), also under a peft wrapper
        if isinstance(module, PreTrainedModel) and isinstance(getattr(module, module.base_model_prefix, None), nn.Module):
            prefix = module.base_model_prefix
            return (f"{name}.{prefix}" if name else prefix), getattr(module, prefix)
    raise ConfigError(f"{type(model).__name__} has no transformer trunk (base_model_prefix): it cannot be sharded")


def fsdp_units(model: nn.Module) -> dict[str, str]:
    """Module name -> FREE/KEEP for every FSDP unit: each decoder layer, each other trunk child that holds
    parameters (embeddings, final norm), and each parameter-holding child of the task model beside the trunk (the LM
    head, a score head). Names of repeated layers use `*` (`model.layers.*`), as transformers' fsdp_plan does."""
    prefix, trunk = _trunk_prefix(model)
    owner = prefix.rsplit(".", 1)[0] if "." in prefix else ""
    task = model.get_submodule(owner) if owner else model
    units = {}
    for name, child in trunk.named_children():
        if isinstance(child, nn.ModuleList):
            units[f"{prefix}.{name}.*"] = FREE
        elif any(True for _ in child.parameters()):
            units[f"{prefix}.{name}"] = FREE
    for name, child in task.named_children():
        full = f"{owner}.{name}" if owner else name
        if child is not trunk and any(True for _ in child.parameters()):
            units[full] = KEEP
    return units


def distributed_config(build_skeleton, shard: bool):
    """What `from_pretrained(distributed_config=...)` takes to load the base sharded over every rank (None: whole).
    The units come from the same model built by `build_skeleton()` on the meta device (no memory, no weights read)."""
    if not shard:
        return None
    from transformers.distributed import DistributedConfig

    with torch.device("meta"):
        skeleton = build_skeleton()
    return DistributedConfig(fsdp_size=world_size(), fsdp_plan=fsdp_units(skeleton))


def own_shards(model: nn.Module) -> None:
    """Each rank's shard of a base loaded with `distributed_config` in storage of its own size. transformers reads each
    weight whole and keeps a slice of it: a copy to a GPU keeps the slice alone, but on the CPU the slice is a view of
    the whole weight, so every rank held the whole base behind its half (as much as DDP), and FSDP kept that storage
    for good (its sharded data is a view of the local tensor). The copies replace the views; FSDP takes them at its
    first forward (reset_sharded_param), and the whole weights are freed."""
    from torch.distributed.tensor import DTensor

    for p in model.parameters():
        if isinstance(p, DTensor):
            local = p._local_tensor
            if local.untyped_storage().nbytes() > local.numel() * local.element_size():
                p._local_tensor = local.clone()


def keep_whole(model: nn.Module, name: str) -> nn.Module:
    """Replace the sharded unit `name` (a direct child, e.g. a reward model's 1 x H `score` head) by a whole copy on
    every rank. peft trains a head through `modules_to_save`, which deep-copies the module, and FSDP refuses that
    ("FSDP does not support deepcopy"); the head is tiny, and the Trainer averages its gradient over the ranks like
    the LoRA weights'. Every rank must call it (gathering is a collective)."""
    from torch.distributed.tensor import DTensor

    def whole_tensor(t):
        return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()

    sharded = model.get_submodule(name)
    if not isinstance(sharded, nn.Linear):
        raise ConfigError(f"the '{name}' head of {type(model).__name__} is a {type(sharded).__name__}, not a linear "
                          f"layer: this reward model cannot be sharded (run it without the FSDP config)")
    weight = whole_tensor(sharded.weight)
    whole = nn.Linear(sharded.in_features, sharded.out_features, bias=sharded.bias is not None, dtype=weight.dtype,
                      device=weight.device)
    with torch.no_grad():
        whole.weight.copy_(weight)
        if sharded.bias is not None:
            whole.bias.copy_(whole_tensor(sharded.bias))
    whole.requires_grad_(sharded.weight.requires_grad)
    setattr(model, name, whole)
    return whole


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def reshard(model: nn.Module) -> None:
    """Free the gathered weights that a forward outside training leaves behind: a `keep_full_weight` unit (the head)
    stays gathered after its forward until a backward frees it. Call after sampling or scoring on a sharded model.
    Why it matters: a training step after such a forward computed other gradients than DDP on the same batch (grad
    norm 3.59 against 3.50 on the tiny Llama), although the Trainer reshards before it builds its optimizer."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


# ---------------------------------------------------------------------------------------------------- measuring, saving

def local_numel(model: nn.Module) -> tuple[int, int]:
    """(elements this rank holds, elements of the whole, elements of the storage behind this rank's: the memory it
    holds) over the frozen base: every parameter that belongs to no adapter (LoRA matrices and peft's copies of heads
    stay whole on every rank, and are small) and is not trained."""
    from torch.distributed.tensor import DTensor

    from pipeline.adapters import adapter_of

    local = full = stored = 0
    for name, p in model.named_parameters():
        if p.requires_grad or adapter_of(name) is not None:
            continue
        t = p.to_local() if isinstance(p, DTensor) else p
        full += p.numel()
        local += t.numel()
        stored += t.untyped_storage().nbytes() // t.element_size()
    return local, full, stored


def sharding_report(model: nn.Module) -> dict:
    """For the manifest: the engine, and each rank's share of the frozen base (gathered: every rank must call)."""
    import torch.distributed as dist

    reshard(model)  # a gathered unit would count whole on every rank
    local, full, stored = local_numel(model)
    per_rank = [(local, stored)]
    if dist.is_available() and dist.is_initialized():
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, (local, stored))
    return {"engine": "fsdp2" if is_sharded(model) else "none", "base_numel_full": full,
            "base_numel_per_rank": [n for n, _ in per_rank], "base_stored_numel_per_rank": [n for _, n in per_rank]}


def full_state_dict(model: nn.Module, keep=lambda name: True) -> dict[str, torch.Tensor]:
    """The named tensors that `keep` selects, whole and on the CPU, on every rank: a sharded tensor is gathered
    (`full_tensor()`, a collective: every rank must call this with the same `keep`)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, t in model.state_dict().items():
        if keep(name):
            out[name] = (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()
    return out


# ---------------------------------------------------------------------------------------------------- spreading work

def rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def spread(n_batches: int, run_batch) -> list:
    """[run_batch(0), ..., run_batch(n_batches - 1)] on every rank, the batches spread over the ranks (batch b on rank
    b % N) and gathered back in order. Ranks run the same number of batches (one with fewer repeats its last and drops
    the result), so that the collectives of a sharded model's forwards pair up. Every rank must call it."""
    import torch.distributed as dist

    rank, world = rank_and_world()
    if world == 1:
        return [run_batch(b) for b in range(n_batches)]
    rounds = -(-n_batches // world)
    mine = {}
    for r in range(rounds):
        b = min(r * world + rank, n_batches - 1)  # past the end: a repeat, run for lockstep only
        result = run_batch(b)
        if r * world + rank < n_batches:
            mine[b] = result
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    merged = {b: out for part in gathered for b, out in part.items()}
    return [merged[b] for b in range(n_batches)]


def on_every_rank(flag: bool, device) -> bool:
    """Is `flag` true on every rank? A collective: every rank must call it."""
    import torch.distributed as dist

    agreed = torch.tensor([int(flag)], device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    return bool(agreed.item())


COLLECTIVE_TIMEOUT_S = 1800  # the Trainer's (ddp_timeout) and gloo's default; NCCL's own is 10 minutes


def process_state():
    """accelerate's PartialState, with the CPU ranks of ACCELERATE_USE_CPU=1 counted: PartialState() alone ignores
    the variable (only AcceleratorState reads it), and without cpu=True two CPU ranks both call themselves rank 0 of 1.
    Its collectives wait 30 minutes, as the Trainer stages' do: under NCCL's default 10, eval's other ranks, waiting at a
    barrier while the main process runs a slow gold judge (an API behind a `module:function`), killed a run that passes
    on CPUs. Stages built on a Trainer get this from TrainingArguments; the others (pairs, PPO, eval) call this."""
    from datetime import timedelta

    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available(),
                        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def require_shared_runs_dir(runs_dir: str, stage: str) -> None:
    """Several machines: RUNS_DIR must be one folder for all of them (NFS or the like). Only the main process writes a
    stage's folder, its checkpoints and its best model, and each rank decides from its own disk whether to resume: on
    a node of its own copy, pairs and eval crashed on a folder never made there, the reward model's ranks scored two
    different models, and a resumed SFT hung with rank 0 resuming while the other node started over. PPO alone runs
    without one (each node keeps its RNG files; rank 0 sends the rest), and does not call this. On one machine nothing
    is checked: every rank sees one disk. A collective: every rank must call it."""
    world = world_size()
    if world <= int(os.environ.get("LOCAL_WORLD_SIZE", str(world))):
        return
    import secrets

    import torch.distributed as dist

    rank = dist.get_rank()
    token = [secrets.token_hex(8) if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    probe = Path(runs_dir).resolve() / f".shared-check-{token[0]}"
    if rank == 0:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.touch()
    dist.barrier()
    seen = [None] * world
    dist.all_gather_object(seen, (probe.exists(), os.environ.get("GROUP_RANK", "?")))
    dist.barrier()  # every rank has looked before the probe goes
    if rank == 0:
        probe.unlink(missing_ok=True)
    blind = sorted({node for found, node in seen if not found})
    if blind:
        raise ConfigError(f"RUNS_DIR {runs_dir} is not one folder for every machine: what node 0 writes there, node(s) "
                          f"{', '.join(blind)} do not see. `{stage}` on several machines needs it on a filesystem they "
                          f"share (NFS or the like; --runs_dir); only PPO runs without one")
