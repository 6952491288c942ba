# Copied from the shared peer scripts (bench/ of the peer-baselines workspace, see PEERS.md there) for make bench-ppo;
# changes: ARCHS + build(scale=...) / --scale for the 125m and micro scales; pool_reward_model and reply_only_reward
# (the story scale's reward model sums its head over the reply, as our reward adapter was trained to); GenCounter
# counts a row's tokens through its first EOS, as ours does.
"""Shared, offline set-up for the peer RL benchmarks (peer_ppo_trl112.py, peer_rloo_trl116.py).

Builds, with no network access:
  * a byte-level BPE tokenizer trained with `tokenizers` on text from Python's own stdlib docstrings
    plus the prompt set (deterministic for a given CPython build);
  * a tiny Llama-style causal LM ("policy"/SFT model, random init);
  * a tiny LlamaForSequenceClassification(num_labels=1) reward model (random init);
  * a value model initialised from the reward model (as TRL's PPO example does);
  * ~256 short prompts from fixed templates.

Everything is written to a model directory (default out/models) so that both venvs load identical
weights. `python peer_common.py build [--dir DIR]` builds it; the bench scripts call ensure_models(),
which builds in a subprocess so the benchmark process's peak RSS is not polluted by the build.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL_DIR = HERE / "out" / "models"

ARCH = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=512)
# Scales for make bench-ppo (bench/bench_ppo.py): "tiny" is the PEERS.md workload; "125m" a Llama-shaped model of
# ~123.5M parameters built from config (random init); "micro" only for the harness smoke test.
ARCHS = {
    "tiny": ARCH,
    "125m": dict(hidden_size=768, intermediate_size=3328, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, max_position_embeddings=512),
    "micro": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=256),
}
VOCAB_SIZE = 2048
N_PROMPTS = 256
SEED = 1234

_SUBJECTS = ["the river", "a small robot", "my neighbour", "the old library", "a lost key", "the winter sky",
             "a red bicycle", "the night train", "a quiet garden", "the city market", "a paper boat",
             "the mountain road", "an empty room", "the morning bus", "a green lamp", "the village school"]
_VERBS = ["Describe", "Write a story about", "Explain", "Tell me about", "Write a poem about",
          "Give three facts about", "Summarise what you know about", "Imagine"]
_TAILS = ["", " in one sentence.", " for a child.", " in a happy tone.", " briefly.", " and why it matters."]


def make_prompts(n: int = N_PROMPTS, seed: int = SEED) -> list[str]:
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        p = f"{rng.choice(_VERBS)} {rng.choice(_SUBJECTS)}{rng.choice(_TAILS)}".strip()
        if p in seen and len(seen) < len(_VERBS) * len(_SUBJECTS) * len(_TAILS):
            continue
        seen.add(p)
        out.append(p)
    return out


def _corpus() -> list[str]:
    import argparse, collections, functools, itertools, json as _json, logging, pathlib, re, string, textwrap
    import typing, unittest, dataclasses, subprocess as _sp, os as _os
    texts = []
    for mod in (argparse, collections, functools, itertools, _json, logging, pathlib, re, string, textwrap,
                typing, unittest, dataclasses, _sp, _os):
        texts.append(inspect.getdoc(mod) or "")
        for name in sorted(dir(mod)):
            if name.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(mod, name, None))
            if doc:
                texts.append(doc)
    texts.extend(make_prompts())
    return texts


def build(model_dir: Path = DEFAULT_MODEL_DIR, scale: str = "tiny") -> None:
    arch = ARCHS[scale]
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification,
                              PreTrainedTokenizerFast)
    model_dir = Path(model_dir)
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                     padding_side="left")
    hf_tok.save_pretrained(tmp / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tmp / "tokenizer")
    for sub in ("policy", "reward", "value"):
        tokenizer.save_pretrained(tmp / sub)

    common = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  tie_word_embeddings=False, **arch)
    cfg = LlamaConfig(**common)
    torch.manual_seed(SEED)
    policy = LlamaForCausalLM(cfg)
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    policy.save_pretrained(tmp / "policy")
    rcfg = LlamaConfig(num_labels=1, **common)
    torch.manual_seed(SEED + 1)
    reward = LlamaForSequenceClassification(rcfg)
    reward.save_pretrained(tmp / "reward")
    reward.save_pretrained(tmp / "value")  # value model initialised from the reward model
    (tmp / "prompts.json").write_text(json.dumps(make_prompts(), indent=0))
    (tmp / "BUILD_INFO.json").write_text(json.dumps({
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "tokenizers": __import__("tokenizers").__version__, "vocab_size": len(tokenizer), "scale": scale, **arch,
        "policy_params": sum(p.numel() for p in policy.parameters()),
        "reward_params": sum(p.numel() for p in reward.parameters())}, indent=1))
    if model_dir.exists():
        import shutil
        shutil.rmtree(model_dir)
    tmp.rename(model_dir)


def ensure_models(model_dir: Path = DEFAULT_MODEL_DIR) -> Path:
    model_dir = Path(model_dir)
    if not (model_dir / "BUILD_INFO.json").exists():
        subprocess.run([sys.executable, str(HERE / "peer_common.py"), "build", "--dir", str(model_dir)], check=True)
    return model_dir


def load_prompts(model_dir: Path) -> list[str]:
    return json.loads((Path(model_dir) / "prompts.json").read_text())


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load_1m() -> float:
    return round(os.getloadavg()[0], 2)


# Written beside our reward adapter (and copied beside the merged peer_reward/ by bench/story.py): how its head's
# per-token outputs become one score. The peers cannot import our pipeline (TRL 1.12 has its own venv), so the rule
# of pipeline/adapters.py (pool_in_forward) is restated here; tests/test_bench_rl.py holds the two equal.
POOLING_FILE = "score_pooling.json"


def pool_reward_model(model, model_dir: Path) -> str:
    """Make a stock *ForSequenceClassification score by the pooling in model_dir's score_pooling.json (none: the
    stock last token). 'sum': the score head's output becomes its running sum over the positions / sum_divisor, so
    that what TRL reads at the last real token, through the model's forward (1.16's reward_funcs) or through the
    backbone and `score` called one after the other (1.12's get_reward), is the sum up to there. No mask is needed:
    1.16 pads on the right, after the token it reads; 1.12's left padding sits in both running sums that
    reply_only_reward subtracts. Our reward sums the reply only; the prompt's part is the same for every completion
    of a prompt (causal attention), so GRPO's and RLOO's group baselines cancel it, and reply_only_reward removes it
    for PPO."""
    path = Path(model_dir) / POOLING_FILE
    spec = json.loads(path.read_text()) if path.is_file() else {"pooling": "last"}
    if spec["pooling"] == "last":
        return "last"
    if spec["pooling"] != "sum":
        raise SystemExit(f"{path}: pooling {spec['pooling']!r} is not one the peers know (last, sum)")
    divisor = float(spec["sum_divisor"])
    model.score.register_forward_hook(lambda module, args, output: output.cumsum(dim=1) / divisor)
    model.score_includes_prompt = True  # reply_only_reward's mark
    return "sum"


def reply_only_reward(get_reward):
    """TRL 1.12's get_reward(model, query_responses, pad_token_id, context_length) -> (per-token logits, score,
    sequence lengths), made to score a model prepared by pool_reward_model on the response only: its per-token
    logits are running sums, and the queries are left-padded to context_length, so the prompt's part is the running
    sum at context_length - 1. Other models (the value model) pass through unchanged."""
    def wrapped(model, query_responses, pad_token_id, context_length):
        logits, score, lengths = get_reward(model, query_responses, pad_token_id, context_length)
        if getattr(model, "score_includes_prompt", False):
            score = score - logits[:, context_length - 1].squeeze(-1)
        return logits, score, lengths
    return wrapped


class GenCounter:
    """Wraps `model.generate` on one instance to count generated tokens and time spent generating. A row's tokens run
    through its first EOS, as ours count them (the response mask): a batch's padding after a row's EOS is not counted
    (counted, the peers' gen tokens/s read up to 25% above ours against the same episodes/s)."""

    def __init__(self):
        self.calls = 0
        self.rows = 0
        self.tokens = 0
        self.seconds = 0.0

    def wrap(self, model):
        orig = model.generate

        def generate(*args, **kwargs):
            inp = kwargs.get("input_ids", args[0] if args else None)
            t0 = time.perf_counter()
            out = orig(*args, **kwargs)
            self.seconds += time.perf_counter() - t0
            seqs = out.sequences if hasattr(out, "sequences") else out
            self.calls += 1
            self.rows += int(seqs.shape[0])
            self.tokens += reply_tokens(seqs[:, inp.shape[1]:], eos_ids(kwargs.get("generation_config"), model))
            return out

        model.generate = generate
        return model


def eos_ids(generation_config, model) -> list[int]:
    """The stop ids generate used: the config it was given, else the model's (generate falls back to them too)."""
    for config in (generation_config, getattr(model, "generation_config", None)):
        eos = getattr(config, "eos_token_id", None)
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
    return []


def reply_tokens(new_ids, eos: list[int]) -> int:
    """Tokens of a [B, T] block of generated ids, each row through its first EOS (all T when it has none)."""
    import torch

    total = 0
    for row in new_ids:
        hits = torch.isin(row, torch.tensor(eos, dtype=row.dtype)).nonzero() if eos else []
        total += int(hits[0]) + 1 if len(hits) else int(row.shape[0])
    return total


def count_copies(named_modules: list[tuple[str, object]]) -> tuple[int, list[str], int]:
    """Distinct model copies (a module whose parameters are all already counted is not a copy) and the total
    number of unique parameter elements across them."""
    seen: set[int] = set()
    names, total = [], 0
    for name, mod in named_modules:
        if mod is None:
            continue
        params = {p.data_ptr(): p.numel() for p in mod.parameters()}
        new = {k: v for k, v in params.items() if k not in seen}
        if new:
            names.append(name)
            total += sum(new.values())
            seen.update(new)
    return len(names), names, total


def git_free_env_info() -> dict:
    import platform
    import torch
    return {"python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count()}


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["build"])
    ap.add_argument("--dir", default=str(DEFAULT_MODEL_DIR))
    ap.add_argument("--scale", default="tiny", choices=sorted(ARCHS))
    a = ap.parse_args()
    build(Path(a.dir), a.scale)
    print(Path(a.dir, "BUILD_INFO.json").read_text())
