"""Loading a base checkpoint, its tokenizer, and LoRA adapters on it: the one place every stage does this.

Adapters are stock PEFT folders. Beside each one we write `pipeline_base.json`, the fingerprint of the base it
was trained on (architecture and shapes), so that a reward adapter trained for another base is refused with a
clear message instead of a wall of size-mismatch errors or, worse, silently random scores.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from pipeline.config import ConfigError, ModelProfile, load_model_profile, resolve_path

FINGERPRINT_FILE = "pipeline_base.json"
FINGERPRINT_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "n_embd", "n_layer", "n_head")


def resolve_base(name_or_path: str) -> str:
    """A repo-relative folder becomes absolute (so adapters record a path that works from any cwd); a Hub id stays."""
    p = resolve_path(name_or_path)
    if p.is_dir():
        return str(p)
    if Path(name_or_path).is_absolute() or name_or_path.startswith((".", "/")) or name_or_path.count("/") > 1:
        raise ConfigError(f"base model folder {name_or_path} does not exist: fix name_or_path in the model profile "
                          f"(or run `make base` to rebuild the embedded tiny model)")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConfigError(f"base model '{name_or_path}' is neither a local folder nor available offline "
                          f"(HF_HUB_OFFLINE=1): download it first or point name_or_path at a local folder")
    return name_or_path  # a Hub id


def profile_from(path: str) -> ModelProfile:
    return load_model_profile(resolve_path(path))


def dtype_of(profile: ModelProfile) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[profile.dtype]


def load_tokenizer(profile: ModelProfile, path: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path or resolve_base(profile.name_or_path), trust_remote_code=profile.trust_remote_code)
    if profile.chat_template:
        tok.chat_template = resolve_path(profile.chat_template).read_text()
    if tok.pad_token is None:  # Llama-3 style bases ship without one; EOS as pad is TRL's convention too
        tok.pad_token = tok.eos_token
    return tok


def quantization_kwargs(profile: ModelProfile) -> dict:
    if not profile.load_in_4bit:
        return {}
    if not torch.cuda.is_available():
        raise ConfigError("load_in_4bit needs a CUDA GPU and bitsandbytes: set load_in_4bit: false in the model profile")
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)}


def load_base(profile: ModelProfile, tokenizer, kind: str = "causal"):
    """The frozen base: a causal LM, or a sequence classifier with one output (`kind="score"`) for reward models."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = resolve_base(profile.name_or_path)
    kwargs = dict(dtype=dtype_of(profile), trust_remote_code=profile.trust_remote_code, **quantization_kwargs(profile))
    try:
        if kind == "score":
            with without_load_report():
                model, info = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, output_loading_info=True,
                                                                                 **kwargs)
            explain_head_swap(model, info, path)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise ConfigError(f"could not load base model '{path}': {err}") from None
    # The score is read at the last token != pad_token_id; the adapter does not carry it (STACK-NOTES 3).
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# ---------------------------------------------------------------- the load report of a causal LM loaded as a reward model

LOAD_REPORT_MARK = "LOAD REPORT"
_explained: set[str] = set()


@contextmanager
def without_load_report():
    """Hold back transformers' LOAD REPORT table ("lm_head.weight UNEXPECTED, score.weight MISSING"), which reads like a
    failure; explain_head_swap says the same in one line and still reports anything that is not the expected swap."""
    class _DropReport(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return LOAD_REPORT_MARK not in record.getMessage()

    logger, drop = logging.getLogger("transformers.modeling_utils"), _DropReport()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def explain_head_swap(model, info: dict, path: str) -> None:
    """A causal LM loaded as a 1-output classifier leaves its LM head unused and starts a fresh score head: expected,
    said once per process. Any other missing, unexpected or reshaped weight is a real problem and is listed."""
    head, trunk = score_head_name(model), model.base_model_prefix + "."
    fresh = sorted(k for k in info["missing_keys"] if k.split(".")[0] == head)
    unused = sorted(k for k in info["unexpected_keys"] if not k.startswith(trunk))  # the LM head: outside the trunk
    other_missing = sorted(set(info["missing_keys"]) - set(fresh))
    other_unexpected = sorted(set(info["unexpected_keys"]) - set(unused))
    mismatched = info.get("mismatched_keys") or []
    if other_missing or other_unexpected or mismatched:
        print(f"warning: loading {path} as a reward model: weights missing from the checkpoint {other_missing}, "
              f"unused {other_unexpected}, reshaped {[k for k, *_ in mismatched]}; only the LM head (unused) and the "
              f"score head (new) are expected to differ", file=sys.stderr)
    elif path not in _explained:
        _explained.add(path)
        lm_head = f"language-model head ({', '.join(unused)})" if unused else "language-model head"
        print(f"note: reward model on {path}: a new scalar head ({', '.join(fresh) or head}) is initialised and trained "
              f"here, and the base's {lm_head} is not used, as expected", file=sys.stderr)


def fingerprint(config) -> dict:
    return {k: getattr(config, k) for k in FINGERPRINT_KEYS if getattr(config, k, None) is not None}


def save_fingerprint(adapter_dir: str | Path, base_config, base_name: str) -> None:
    with open(Path(adapter_dir) / FINGERPRINT_FILE, "w") as f:
        json.dump({"base_model": base_name, "fingerprint": fingerprint(base_config)}, f, indent=2)


def check_adapter(adapter_dir: str | Path, base_config, what: str) -> Path:
    """Refuse a missing adapter, or one trained on another base, with one clear message."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ConfigError(f"{what} adapter {adapter_dir} is missing (no adapter_config.json): rerun the stage that makes it")
    fp_file = adapter_dir / FINGERPRINT_FILE
    if fp_file.is_file():
        saved = json.loads(fp_file.read_text())
        mine = fingerprint(base_config)
        diff = {k: (saved["fingerprint"].get(k), mine.get(k)) for k in set(saved["fingerprint"]) | set(mine)
                if saved["fingerprint"].get(k) != mine.get(k)}
        if diff:
            raise ConfigError(
                f"{what} adapter {adapter_dir} was trained on base '{saved.get('base_model')}', which differs from the "
                f"base in use ({', '.join(f'{k}: adapter {a} vs base {b}' for k, (a, b) in sorted(diff.items()))}): "
                f"use the same model profile for every stage of a run, or retrain the adapter"
            )
    return adapter_dir


def lora_config(profile: ModelProfile, r: int, alpha: int, dropout: float, task_type: str = "CAUSAL_LM", **extra):
    from peft import LoraConfig

    return LoraConfig(task_type=task_type, r=r, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=list(profile.lora_target_modules), **extra)


def backbone(model: nn.Module) -> nn.Module:
    """The transformer trunk under a *ForCausalLM (`model.model`, `model.transformer`, `model.gpt_neox`)."""
    return getattr(model, model.base_model_prefix)


def score_head_name(model) -> str:
    """Name of the scalar head a *ForSequenceClassification uses (`score` for most, `classifier` for a few)."""
    return "score" if not hasattr(model, "classifier") else "classifier"
