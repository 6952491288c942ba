"""Fixtures: a real chat tokenizer (trained here in seconds) and tiny random models of four architectures.

Every stage test runs the stage's real main() on the real YAML with tiny overrides, against these models, so
each stage is checked on the real transformers/peft code paths of Llama, Qwen2, GPT-2 and GPT-NeoX.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
ACCELERATE = str(Path(sys.executable).parent / "accelerate")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ARCH_TARGETS = {
    "llama": LLAMA_TARGETS,
    "qwen2": LLAMA_TARGETS,
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}
ARCHS = list(ARCH_TARGETS)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """The pipeline's own tokenizer recipe (stages/base.py) on two small books: chat template + special tokens."""
    from stages.base import clean, train_tokenizer

    texts = [clean((REPO / "data/pretrain/texts" / f).read_text()) for f in ("bunny.txt", "alice.txt")]
    tok = train_tokenizer(texts, vocab_size=512)
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(out)
    return out


def build_tiny_model(arch: str, tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    # initializer_range 0.3 (HF default 0.02): a random model at 0.02 is so close to uniform that a few LoRA steps
    # cannot move its loss visibly; at 0.3 "the loss falls" and "the reward rises" are testable in seconds.
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               initializer_range=0.3)
    if arch in ("llama", "qwen2"):
        cfg = AutoConfig.for_model(arch, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, **ids)
    elif arch == "gpt2":
        cfg = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=512, **ids)
    else:
        cfg = AutoConfig.for_model("gpt_neox", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=512, **ids)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer_dir):
    """arch -> model profile YAML path, for a tiny random model of that architecture."""
    root = tmp_path_factory.mktemp("models")
    profiles = {}
    for arch in ARCHS:
        model_dir = build_tiny_model(arch, tokenizer_dir, root / arch)
        profile = root / f"{arch}.yaml"
        profile.write_text(f"name_or_path: {model_dir}\nlora_target_modules: {ARCH_TARGETS[arch]}\n")
        profiles[arch] = profile
    return profiles


@pytest.fixture
def runs_dir(tmp_path):
    return tmp_path / "runs"


def run_module(module: str, args: list[str], processes: int = 1, timeout: int = 600, env: dict | None = None):
    """Run a stage as the Makefile does: under `accelerate launch` (two real gloo processes when asked)."""
    cfg = "configs/accelerate/cpu2.yaml" if processes == 2 else "configs/accelerate/cpu.yaml"
    cmd = [ACCELERATE, "launch", "--config_file", cfg]
    if processes == 2:  # a free port per test: parallel or back-to-back runs must not collide
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            cmd += ["--main_process_port", str(s.getsockname()[1])]
    cmd += ["-m", module, *args]
    extra = {"ACCELERATE_USE_CPU": "1"} if processes == 2 else {}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **extra, **(env or {})})


def run_python(module: str, args: list[str], timeout: int = 600, env: dict | None = None):
    return subprocess.run([PYTHON, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
