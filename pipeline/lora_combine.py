"""Two stacked LoRA adapters -> one stock LoRA adapter on the raw base, exactly.

DPO trains a second LoRA on (base + SFT LoRA merged). Per target module that policy computes

    W x + s1 B1 A1 x + s2 B2 A2 x  =  W x + s B A x,   A = [A1; A2],  B = [s1 B1, s2 B2] / s

so one LoRA of rank r1 + r2 holds both. We save it with lora_alpha = r (scaling s = 1), so B is just the two scaled
B matrices side by side: any tool that loads a PEFT adapter loads the DPO policy on the raw base, like PPO's.
Only plain LoRA combines this way (no DoRA, no per-module rank/alpha patterns, no extra trained modules), and both
adapters must wrap the same modules: anything else is refused before training starts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from pipeline.config import ConfigError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def lora_scaling(config: dict, r: int) -> float:
    """peft's scaling of a LoRA update: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
    alpha = config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def target_set(config: dict) -> set[str]:
    targets = config.get("target_modules")
    return {targets} if isinstance(targets, str) else set(targets or [])


def require_combinable(adapter_dir: str | Path, targets: list[str], what: str) -> None:
    """Refuse, before any training, an adapter that cannot be combined exactly with a new LoRA on `targets`."""
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    extras = {k: config.get(k) for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save",
                                         "target_parameters", "trainable_token_indices") if config.get(k)}
    if config.get("peft_type") != "LORA" or config.get("bias", "none") != "none" or extras:
        raise ConfigError(f"{what} adapter {adapter_dir} is not a plain LoRA (peft_type {config.get('peft_type')}, bias "
                          f"{config.get('bias')}, {extras or 'no extras'}): only plain LoRA adapters combine exactly "
                          f"with the DPO adapter; retrain it without DoRA, patterns or modules_to_save")
    if target_set(config) != set(targets):
        raise ConfigError(f"{what} adapter {adapter_dir} targets {sorted(target_set(config))}, the model profile "
                          f"{sorted(targets)}: the DPO adapter is combined with it into one LoRA, which needs the same "
                          f"target modules; set lora_target_modules in the model profile to the adapter's")
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), "pt") as f:
        other = [k for k in f.keys() if not k.endswith(LORA_SUFFIXES)]
    if other:
        raise ConfigError(f"{what} adapter {adapter_dir} holds weights other than LoRA A/B matrices ({other[:3]}): "
                          f"they cannot be combined with the DPO adapter; retrain it as a plain LoRA")


def combine_loras(first: dict[str, torch.Tensor], first_config: dict, second: dict[str, torch.Tensor],
                  second_config: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """State dicts (peft's saved keys, `...q_proj.lora_A.weight`) of two LoRAs on the same modules -> the state dict
    and config of the one LoRA equal to applying both (first, then second on top of the first merged in)."""
    modules = {k.removesuffix(LORA_SUFFIXES[0]) for k in first if k.endswith(LORA_SUFFIXES[0])}
    second_modules = {k.removesuffix(LORA_SUFFIXES[0]) for k in second if k.endswith(LORA_SUFFIXES[0])}
    if modules != second_modules:
        raise ConfigError(f"the two LoRA adapters wrap different modules ({sorted(modules ^ second_modules)[:4]}...): "
                          f"only adapters on the same target modules combine into one")
    combined, ranks = {}, set()
    for m in sorted(modules):
        a1, b1, a2, b2 = (d[m + s] for d, s in ((first, ".lora_A.weight"), (first, ".lora_B.weight"),
                                               (second, ".lora_A.weight"), (second, ".lora_B.weight")))
        dtype = torch.promote_types(a1.dtype, a2.dtype)  # peft keeps LoRA weights in float32 (float64 in a test)
        s1, s2 = lora_scaling(first_config, a1.shape[0]), lora_scaling(second_config, a2.shape[0])
        combined[m + ".lora_A.weight"] = torch.cat([a1, a2], dim=0).to(dtype).contiguous()
        scaled = torch.cat([b1.double() * s1, b2.double() * s2], dim=1)  # / s, and s = 1; scaled in float64, rounded once
        combined[m + ".lora_B.weight"] = scaled.to(dtype).contiguous()
        ranks.add(a1.shape[0] + a2.shape[0])
    if len(ranks) != 1:  # require_combinable refused rank patterns, so every module has r1 + r2
        raise ConfigError(f"the combined LoRA would have different ranks per module ({sorted(ranks)})")
    r = ranks.pop()
    config = {**first_config, "r": r, "lora_alpha": r, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}}
    return combined, config


def save_lora(out_dir: str | Path, state: dict[str, torch.Tensor], config: dict, base_model: str) -> Path:
    """A stock PEFT adapter folder: adapter_config.json (written by peft itself) + adapter_model.safetensors."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_config = LoraConfig.from_peft_type(**{**config, "base_model_name_or_path": base_model})
    peft_config.save_pretrained(str(out_dir))
    save_file(state, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out_dir


def merge_into_base(peft_model):
    """The base with the adapter merged in, as peft's `merge_and_unload()` (W += B A s per module, same arithmetic),
    also where the base is sharded by FSDP2: peft adds the whole update to each weight, which a DTensor refuses, so
    the update is sharded like the weight first (each rank adds its rows). Plain LoRA only (require_combinable)."""
    from peft.tuners.lora import LoraLayer
    from torch.distributed.tensor import DTensor, distribute_tensor

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            weight = module.get_base_layer().weight
            for name in module.active_adapters:
                # In the adapter's dtype (peft loads it in fp32): added as it is, the sum rounds once to a bf16 base's
                # dtype, as in peft's merge; cast first, it would round twice
                update = module.get_delta_weight(name)
                if isinstance(weight, DTensor):
                    update = distribute_tensor(update, weight.device_mesh, weight.placements)
                with torch.no_grad():
                    weight.add_(update)
    return peft_model.unload()
