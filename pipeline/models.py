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

from pipeline.config import ConfigError, ModelProfile, load_model_profile, read_utf8, resolve_path

FINGERPRINT_FILE = "pipeline_base.json"
FINGERPRINT_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "n_embd", "n_layer", "n_head")


def hub_cached(repo_id: str) -> bool:
    """Is this Hub model in the local cache (`hf download`, an earlier online run)? Offline, transformers loads it from
    there."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def resolve_base(name_or_path: str) -> str:
    """A repo-relative folder becomes absolute (so adapters record a path that works from any cwd); a Hub id stays."""
    p = resolve_path(name_or_path)
    if p.is_dir() and (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
        try:
            under = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            under = None
        raise ConfigError(f"base model folder {name_or_path} is a LoRA adapter, not a base model: point name_or_path in "
                          f"the model profile at the base it was trained on" + (f" ({under})" if under else ""))
    if p.is_dir():
        return str(p)
    if p.exists():
        raise ConfigError(f"base model folder {name_or_path} is a file, not a folder: point name_or_path in the model "
                          f"profile at the folder that holds config.json and the weights")
    if Path(name_or_path).is_absolute() or name_or_path.startswith((".", "/")) or name_or_path.count("/") > 1:
        raise ConfigError(f"base model folder {name_or_path} does not exist: fix name_or_path in the model profile "
                          f"(or run `make base` to rebuild the embedded tiny model)")
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not hub_cached(name_or_path):
        raise ConfigError(f"base model '{name_or_path}' is neither a local folder nor in the Hub cache, and the Hub is "
                          f"offline (HF_HUB_OFFLINE=1): download it first (`hf download {name_or_path}`) or point "
                          f"name_or_path at a local folder")
    return name_or_path  # a Hub id


def profile_from(path: str) -> ModelProfile:
    return load_model_profile(resolve_path(path))


def require_model_config(path: str, name_or_path: str) -> str:
    """A local base folder must hold config.json: without it transformers' AutoConfig raised ValueError ("Unrecognized
    model ...") out of every stage as a traceback. (A tokenizer alone may live in a folder without one.)"""
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise ConfigError(f"base model folder {name_or_path} has no config.json: point name_or_path in the model "
                          f"profile at a complete checkpoint folder (config.json, the weights and the tokenizer files, "
                          f"as save_pretrained writes them), or copy the checkpoint's config.json into it")
    return path


def base_config(profile: ModelProfile):
    """The base checkpoint's config, read as the profile says (its own code run when it trusts it): what the stages
    check an upstream adapter and the prompts' length against before they touch the run folder."""
    from transformers import AutoConfig

    path = require_model_config(resolve_base(profile.name_or_path), profile.name_or_path)
    return AutoConfig.from_pretrained(path, trust_remote_code=profile.trust_remote_code)


def require_score_class(model_config: str) -> None:
    """A reward model is the base's *ForSequenceClassification: a family transformers has none for (Granite, Cohere)
    stopped `make rm` with a traceback after SFT, pairs and labels had run. Checked up front from the base's config; a
    config that cannot be read here (a Hub id not downloaded yet) is left to the stage, which says so in one line."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    profile = profile_from(model_config)
    try:
        config = base_config(profile)
    except (OSError, ValueError):
        return
    own_code = "AutoModelForSequenceClassification" in (getattr(config, "auto_map", None) or {})
    if config.model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES and not own_code:
        import transformers

        raise ConfigError(f"the base {profile.name_or_path} ({config.model_type}, model profile {model_config}) has no "
                          f"sequence-classification model in transformers {transformers.__version__}, which a reward "
                          f"model is: `make rm` (and PPO, GRPO, RLOO, REINFORCE++, which score with it) cannot run on it; "
                          f"`make dpo` trains on the labels without a reward model")


def position_limit(config) -> int | None:
    """The base's positions (`config`: base_config), by whichever name its architecture gives them; None if none."""
    return next((v for k in ("max_position_embeddings", "n_positions", "n_ctx")
                 if isinstance(v := getattr(config, k, None), int) and v > 0), None)


def check_context(config, longest_prompt: int, new_tokens: int, flag: str, prompt_flag: str, closing: int = 0) -> None:
    """A prompt and its reply must fit the base's positions (`config`: base_config): past them an absolute-position
    model (GPT-2) fails with an index error mid-sampling, after the run folder was prepared, and a rotary one reads
    positions it never trained on. `closing`: the template's tokens after a reply (reply_closing_tokens), which the
    reward model reads after the longest reply."""
    limit = position_limit(config)
    if limit is not None and longest_prompt + new_tokens + closing > limit:
        closed = f" and the chat template's {closing} closing tokens after the reply" if closing else ""
        raise ConfigError(f"the longest prompt ({longest_prompt} tokens with the chat template) and {flag} {new_tokens}"
                          f"{closed} make {longest_prompt + new_tokens + closing} positions, more than the base model's "
                          f"{limit}: lower {flag} or {prompt_flag}")


def check_training_length(config, max_length: int | None, longest: int | None) -> None:
    """A training row must fit the base's positions, as a sampled one must (check_context): past them a learned-
    position base (GPT-2) fails with an index error mid-training, after the run folder was prepared, and a rotary one
    trains on positions it never saw. `longest`: the longest row as tokenized before the trainer (cut to max_length
    there); None where the trainer tokenizes or packs the rows itself, when max_length alone is checked."""
    limit = position_limit(config)
    length = max_length if longest is None else min(longest, max_length or longest)
    if limit is not None and length is not None and length > limit:
        raise ConfigError(f"training rows of up to {length} tokens (with the chat template; max_length {max_length}) do "
                          f"not fit the base model's {limit} positions: set --max_length {limit} or less")


def dtype_of(profile: ModelProfile) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[profile.dtype]


MIXED_PRECISION_DTYPE = {"bf16": "bfloat16", "fp16": "float16"}  # accelerate's mixed_precision -> autocast dtype


def launch_mixed_precision() -> str:
    """The launch's `mixed_precision`: the accelerate config's, which `accelerate launch` passes on as
    ACCELERATE_MIXED_PRECISION ("no", "bf16" or "fp16"; configs/accelerate/multi_gpu.yaml and fsdp.yaml say bf16)."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()


def launch_autocast(device: torch.device, what: str, training: bool = False):
    """For forwards that run outside a Trainer (PPO's rollouts and updates; sampling and scoring in pairs and eval):
    the launch's mixed precision as torch.autocast, as accelerate gives the Trainer stages; nothing under "no". fp16
    autocast in training needs a loss scaler, which PPO's loop does not have: refused, naming bf16 (`what`: the
    stage, for the error)."""
    from contextlib import nullcontext

    mixed = launch_mixed_precision()
    if mixed in ("no", ""):
        return nullcontext()
    if mixed == "fp16" and training:
        raise ConfigError(f"{what} cannot train under fp16 mixed precision (it has no loss scaler): set "
                          f"`mixed_precision: bf16` or `no` in the accelerate config, or give `--mixed_precision bf16` "
                          f"(or no) to `accelerate launch` if you gave it fp16 there")
    if mixed not in MIXED_PRECISION_DTYPE:
        raise ConfigError(f"mixed_precision '{mixed}' in the accelerate config: {what} runs 'bf16', 'fp16' or 'no'")
    return torch.autocast(device.type, dtype=getattr(torch, MIXED_PRECISION_DTYPE[mixed]))


def is_template_text(value: str) -> bool:
    """Whether a profile's `chat_template` holds the Jinja text itself, not the path of a .jinja file."""
    return "{{" in value or "{%" in value


def template_text(value: str) -> str:
    """A profile's `chat_template`: the Jinja text itself, or a .jinja file (repo-relative or absolute)."""
    if is_template_text(value):
        return value
    path = resolve_path(value)
    if not path.is_file():
        raise ConfigError(f"chat_template file {value} of the model profile does not exist: give a .jinja file (for "
                          f"example one of trl/chat_templates/) or the template text itself")
    return read_utf8(path, f"chat_template file {value} of the model profile")


def load_tokenizer(profile: ModelProfile, path: str | None = None):
    """The base's tokenizer, with the profile's chat template when the profile names one."""
    from transformers import AutoTokenizer

    where = path or resolve_base(profile.name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=profile.trust_remote_code)
    except (OSError, ValueError) as err:  # a folder without a model's files, or a Hub id that did not download
        why = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        if Path(where).is_dir():
            raise ConfigError(f"no tokenizer loads from {where} ({why}): name_or_path in the model profile must be a "
                              f"model folder (config.json and tokenizer files) or a Hub model id") from None
        raise ConfigError(f"no tokenizer loads from the Hub id {where} ({why}): check the id, the network (HF_ENDPOINT, "
                          f"a proxy) and, for a gated model such as Llama, its license on the Hub and `hf auth login`; "
                          f"or `hf download {where}` where there is a network and point name_or_path at that folder"
                          ) from None
    if profile.chat_template:
        tok.chat_template = template_text(profile.chat_template)
    if tok.pad_token is None:  # Llama-3 style bases ship without one; EOS as pad is TRL's convention too
        tok.pad_token = tok.eos_token
    return tok


def require_chat_template(tokenizer, profile: ModelProfile) -> None:
    """Stages that chat refuse a base without a template (most pretrained-only checkpoints) before they touch
    their run folder, instead of failing deep inside TRL or generation."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"the tokenizer of {profile.name_or_path} has no chat template: add `chat_template:` to the "
                          f"model profile (--model_config / MODEL=...), a .jinja file such as one of "
                          f"trl/chat_templates/ or the template text itself")


def refuse_tokenizer_options(train_cfg, stage: str, model_config: str) -> None:
    """TRL's chat_template_path and eos_token (SFTConfig, RewardConfig) change the tokenizer inside the trainer's
    __init__, after the stage has tokenized its data with the model profile's tokenizer: the data, the tokenizer saved
    beside the adapter and the other stages (which load the profile's) would disagree. Refused before anything runs."""
    template, eos = getattr(train_cfg, "chat_template_path", None), getattr(train_cfg, "eos_token", None)
    if template:
        raise ConfigError(f"--chat_template_path {template}: `make {stage}` tokenizes its data with the model "
                          f"profile's chat template before TRL would switch to this one, and the other stages use the "
                          f"profile's: remove it and set chat_template: {template} in the model profile "
                          f"({model_config}) instead (a .jinja file or the template text)")
    if eos:
        raise ConfigError(f"--eos_token {eos}: `make {stage}` tokenizes its data with the model profile's tokenizer "
                          f"(its turns end as its chat template ends them) before TRL would make {eos} the EOS, and "
                          f"the other stages use the profile's: remove it; to end turns with another token, give the "
                          f"model profile ({model_config}) a chat_template: that ends them with it")


def bnb_4bit_config(dtype: str = "bfloat16"):
    """QLoRA's 4-bit base (Dettmers et al. 2023): NF4, double quantization, computing in bf16, or in fp16 for a
    `dtype: float16` profile (GPUs without bf16, such as the T4 and V100, where the rest of the model is fp16 too)."""
    from transformers import BitsAndBytesConfig

    compute = torch.float16 if dtype == "float16" else torch.bfloat16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                              bnb_4bit_use_double_quant=True)


def quantization_kwargs(profile: ModelProfile) -> dict:
    if not profile.load_in_4bit:
        return {}
    if not torch.cuda.is_available():
        raise ConfigError("load_in_4bit needs a CUDA GPU and bitsandbytes: set load_in_4bit: false in the model profile")
    from accelerate import PartialState

    # A 4-bit model cannot be moved after loading: load it straight onto this process's GPU.
    return {"quantization_config": bnb_4bit_config(profile.dtype), "device_map": {"": PartialState().device}}


def load_base(profile: ModelProfile, tokenizer, kind: str = "causal", shard: bool = False):
    """The frozen base: a causal LM, or a sequence classifier with one output (`kind="score"`) for reward models.
    `shard`: FSDP2 over every rank (pipeline.sharding): each rank reads and keeps only its shard of each weight."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from pipeline import sharding

    path = require_model_config(resolve_base(profile.name_or_path), profile.name_or_path)
    if shard and profile.load_in_4bit:
        raise ConfigError("load_in_4bit cannot be combined with FSDP sharding: use one GPU (QLoRA) or a bf16 base "
                          "under configs/accelerate/fsdp.yaml")
    auto, extra = (AutoModelForSequenceClassification, {"num_labels": 1}) if kind == "score" else (AutoModelForCausalLM, {})
    kwargs = dict(dtype=dtype_of(profile), trust_remote_code=profile.trust_remote_code, **quantization_kwargs(profile), **extra)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=profile.trust_remote_code, **extra) if shard else None
        plan = sharding.distributed_config(lambda: auto.from_config(config, trust_remote_code=profile.trust_remote_code), shard)
        plan_kwargs = {"distributed_config": plan} if plan else {}
        if kind == "score":
            with without_load_report():
                model, info = auto.from_pretrained(path, output_loading_info=True, **kwargs, **plan_kwargs)
            explain_head_swap(model, info, path)
        else:
            model = auto.from_pretrained(path, **kwargs, **plan_kwargs)
    except OSError as err:
        raise ConfigError(f"could not load base model '{path}': {err}") from None
    if shard:
        sharding.own_shards(model)
    if shard and kind == "score":
        sharding.keep_whole(model, score_head_name(model))  # peft deep-copies the head it trains; FSDP refuses that
    # The score is read at the last token != pad_token_id; the adapter does not carry it.
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config = plain_sampling_config(model.generation_config, tokenizer.pad_token_id)
    check_lora_targets(profile, model, path)
    return model


def plain_sampling_config(loaded, pad_token_id: int):
    """The checkpoint's generation_config with only its special tokens kept. Every sampler here draws from
    softmax(logits / T) with the stage's own top_p / top_k, as PPO's sampler does and the KL figures assume; a
    checkpoint's sampling defaults (Qwen's repetition_penalty 1.1, a no_repeat_ngram_size, min_new_tokens) would
    otherwise apply to pairs and eval, silently, since generate() fills every field it is not given from them."""
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=loaded.bos_token_id, eos_token_id=loaded.eos_token_id, pad_token_id=pad_token_id)


def head_names(model: nn.Module) -> list[str]:
    """The full names of the model's output head (the LM head) and score head, where it has them."""
    heads = {id(getattr(model, score_head_name(model), None))}
    if hasattr(model, "get_output_embeddings"):
        heads.add(id(model.get_output_embeddings()))
    return [name for name, m in model.named_modules() if name and id(m) in heads]


def lora_linear_layers(model: nn.Module) -> list[str]:
    """The full names of the leaf linear layers (nn.Linear, GPT-2's Conv1D) LoRA may wrap: all but the output head
    (TRL refuses a LoRA on the LM head) and a score head (trained whole, beside the adapter)."""
    from transformers.pytorch_utils import Conv1D

    heads = head_names(model)
    return [name for name, m in model.named_modules()
            if name and isinstance(m, (nn.Linear, Conv1D)) and name not in heads]


def linear_layer_names(model: nn.Module) -> list[str]:
    """The distinct names of the layers LoRA can target (lora_linear_layers), as a profile names them."""
    return sorted({name.rsplit(".", 1)[-1] for name in lora_linear_layers(model)})


def check_lora_targets(profile: ModelProfile, model: nn.Module, base_name: str) -> None:
    """Every target in the profile must name linear layers of this model (peft matches a name or a dotted suffix).
    peft itself raises only when none matches, and then without saying what would."""
    targets = profile.lora_target_modules  # a list of names: the profile refuses anything else
    named = lambda t, names: any(n == t or n.endswith("." + t) for n in names)  # noqa: E731
    linear = lora_linear_layers(model)
    missing = [t for t in targets if not named(t, linear)]
    heads = [t for t in missing if named(t, head_names(model))]
    if heads:
        raise ConfigError(f"LoRA target module(s) {heads} of {base_name} ({model.config.model_type}) are its output "
                          f"or score head, which LoRA does not wrap (TRL refuses the LM head; a score head trains "
                          f"whole): set lora_target_modules in the model profile to some of its other linear layers: "
                          f"{linear_layer_names(model)}")
    if missing or not targets:
        what = f"LoRA target module(s) {missing} are not in" if missing else "no LoRA target modules are set for"
        raise ConfigError(f"{what} {base_name} ({model.config.model_type}): set lora_target_modules in the model "
                          f"profile to some of its linear layers: {linear_layer_names(model)}")


def free_memory() -> None:
    """After `del` of the last reference to a model: collect it now and give the accelerator's cached memory back, so
    that the next model this process loads (another ensemble member, a reload check's base) fits beside nothing."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def to_device(model: nn.Module, device=None) -> nn.Module:
    """Put a model on this process's accelerator (accelerate's PartialState().device: a GPU when there is one). A
    quantized model was loaded there and cannot be moved; a sharded one (pipeline.sharding) was loaded onto this
    process's device, and moving FSDP2-managed weights raises."""
    from pipeline.sharding import is_sharded

    if getattr(model, "is_quantized", False) or is_sharded(model):
        return model
    if device is None:
        from accelerate import PartialState

        device = PartialState().device
    return model.to(device)


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


def is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def explain_head_swap(model, info: dict, path: str) -> None:
    """A causal LM loaded as a 1-output classifier leaves its LM head unused and starts a fresh score head: expected,
    said once, by the main process. Any other missing, unexpected or reshaped weight is a real problem and is listed."""
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
    elif path not in _explained and is_main_process():  # said once a launch, not once a rank
        _explained.add(path)
        lm_head = f"language-model head ({', '.join(unused)})" if unused else "language-model head"
        print(f"note: reward model on {path}: a new scalar head ({', '.join(fresh) or head}) is initialised and trained "
              f"here, and the base's {lm_head} is not used, as expected", file=sys.stderr)


def fingerprint(config) -> dict:
    """The base's type and sizes; a vision-language base's (Gemma 3 4B and up) sizes are its text model's, which
    its top config holds under text_config."""
    text = config.get_text_config()
    values = {k: getattr(config if k == "model_type" else text, k, None) for k in FINGERPRINT_KEYS}
    return {k: v for k, v in values.items() if v is not None}


def hidden_size_of(config) -> int:
    """The width of the hidden state the heads read: the text model's (hidden_size; GPT-2's n_embd)."""
    text = config.get_text_config()
    return text.hidden_size if hasattr(text, "hidden_size") else text.n_embd


def save_fingerprint(adapter_dir: str | Path, base_config, base_name: str) -> None:
    with open(Path(adapter_dir) / FINGERPRINT_FILE, "w") as f:
        json.dump({"base_model": base_name, "fingerprint": fingerprint(base_config)}, f, indent=2)


def unreadable_weights(weights: Path) -> str | None:
    """Why a safetensors file cannot be read (its header or its length: a truncated file), or None; read lazily, no
    tensor loaded. A missing file is another check's (a .bin adapter has none)."""
    if not weights.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(weights), "pt"):
            return None
    except Exception as err:  # SafetensorError: "invalid header length", "incomplete metadata, file not fully covered"
        return str(err)


def check_adapter(adapter_dir: str | Path, base_config, what: str, flag: str | None = None) -> Path:
    """Refuse a missing adapter, or one trained on another base, with one clear message. `flag`: the option that named
    the folder (your adapter, which no stage makes): the message names it, not a stage to rerun."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ConfigError(f"{flag} {adapter_dir} is not a PEFT adapter folder (no adapter_config.json): give {flag} the "
                          f"folder that holds adapter_config.json and the adapter's weights (a stage's adapter/)" if flag
                          else f"{what} adapter {adapter_dir} is missing (no adapter_config.json): rerun the stage that makes it "
                          f"with FORCE=1 (`make` takes a stage whose outputs went as up to date)")
    damage = unreadable_weights(adapter_dir / "adapter_model.safetensors")
    if damage and flag:
        raise ConfigError(f"{flag} {adapter_dir} is damaged: adapter_model.safetensors cannot be read ({damage}; cut "
                          f"short by a copy or a full disk?): copy the adapter again, or give {flag} another one")
    if damage:  # `make` sees its stage as up to date (a manifest records inputs, not its outputs' bytes): FORCE=1
        raise ConfigError(f"{what} adapter {adapter_dir} is damaged: adapter_model.safetensors cannot be read ({damage}; "
                          f"cut short by a copy or a full disk?): rerun the stage that makes it with FORCE=1")
    fp_file = adapter_dir / FINGERPRINT_FILE
    if fp_file.is_file():
        saved = json.loads(fp_file.read_text())
        mine = fingerprint(base_config)
        # The keys the adapter's fingerprint holds: an earlier version saved a vision-language base's type alone
        diff = {k: (saved["fingerprint"].get(k), mine.get(k)) for k in saved["fingerprint"]
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

    try:
        vision_language = is_vision_language(base_config(profile))
    except (OSError, ValueError):  # a config not readable here: the stage that loads the base says why
        vision_language = False
    if "exclude_modules" not in extra and vision_language:
        # Its vision tower has q_proj, ... too: LoRA there is never trained on text (nothing reaches it) and only
        # grows the adapter (Gemma 3 4B: a quarter of the wrapped modules). The text model's layers alone.
        extra["exclude_modules"] = VISION_MODULES
    return LoraConfig(task_type=task_type, r=r, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=list(profile.lora_target_modules), **extra)


VISION_MODULES = r".*(vision_tower|vision_model|multi_modal_projector|visual)\..*"


def is_vision_language(config) -> bool:
    """A base whose text model is one part of it (Gemma3ForConditionalGeneration, ...): its sizes sit under
    text_config."""
    return config.get_text_config() is not config


def backbone(model: nn.Module) -> nn.Module:
    """The transformer trunk under a *ForCausalLM (`model.model`, `model.transformer`, `model.gpt_neox`)."""
    return getattr(model, model.base_model_prefix)


def score_head_name(model) -> str:
    """Name of the scalar head a *ForSequenceClassification uses (`score` for most, `classifier` for a few)."""
    return "score" if not hasattr(model, "classifier") else "classifier"
