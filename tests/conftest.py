"""Fixtures: a real chat tokenizer (trained here in seconds) and tiny random models of four architectures.

Every stage test runs the stage's real main() on the real YAML with tiny overrides, against these models, so
each stage is checked on the real transformers/peft code paths of Llama, Qwen2, GPT-2 and GPT-NeoX.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.launch import ACCELERATE_LAUNCH, free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

# `make test` hands pytest-xdist whole files (--dist loadfile) in collection order (--no-loadscope-reorder).
# xdist's own order (by number of tests, most first) started test_journey.py, the longest file (two tests, one
# process at a time), last: one worker ran it alone at the end while the other idled. It goes first; every other file
# follows as xdist would order it. Putting every long file first was slower (a fresh clone, alone: 1,271 s against
# 998-1,195 s): they are the 2-process ones, and two of them at once run 4 processes on 2 cores, waiting on each other.
LONGEST_FILES_FIRST = ("test_journey.py",)


def files_longest_first(files: list[str], tests_in: dict[str, int]) -> list[str]:
    """The order the suite's files start in: LONGEST_FILES_FIRST's, then the rest by their number of tests, most
    first, as xdist orders them (ties by name, so every worker collects the same order)."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    return sorted(files, key=lambda f: (rank.get(Path(f).name, len(rank)), -tests_in[f], f))


def pytest_collection_modifyitems(config, items):
    from collections import Counter

    file_of = lambda item: item.nodeid.split("::")[0]  # noqa: E731
    tests_in = Counter(map(file_of, items))
    start = {f: i for i, f in enumerate(files_longest_first(list(tests_in), tests_in))}
    items.sort(key=lambda item: start[file_of(item)])  # stable: a file's own tests keep their order


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


# Architectures whose attention can see only the last `sliding_window` positions (Mistral v0.1, Qwen2 with
# use_sliding_window, Gemma2's local layers): caches and padding must not let a window count pad columns.
SLIDING_WINDOW_ARCHS = ["gemma2", "mistral", "qwen2"]


def random_model(arch: str, kind: str, sliding_window: int | None = None, pad_token_id: int = 0,
                 eos_token_id: int | None = None):
    """A random 2-layer `kind` ("causal" LM or "score" model, vocabulary 64) of `arch`, in eval mode, with weights
    drawn wide (initializer_range 0.3) so that a wrong token or position moves the output visibly. `sliding_window`
    (SLIDING_WINDOW_ARCHS): every layer windowed to that many positions."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    extra = {}
    if sliding_window is not None:
        extra = {"qwen2": {"use_sliding_window": True, "max_window_layers": 0},
                 "gemma2": {"layer_types": ["sliding_attention"] * 2}}.get(arch, {})  # Gemma2: all layers local
        extra["sliding_window"] = sliding_window
    if arch.startswith("gemma"):
        extra["head_dim"] = 8
    cfg = AutoConfig.for_model(arch, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, num_labels=1, initializer_range=0.3,
                               pad_token_id=pad_token_id, eos_token_id=eos_token_id, attn_implementation="eager",
                               **extra)
    torch.manual_seed(0)
    auto = AutoModelForSequenceClassification if kind == "score" else AutoModelForCausalLM
    return auto.from_config(cfg).eval()


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


def run_module(module: str, args: list[str], processes: int = 1, timeout: int = 600, env: dict | None = None,
               fsdp: bool = False):
    """Run a stage as the Makefile does: under `accelerate launch` (two real gloo processes when asked; `fsdp`: two
    processes under the FSDP2 config, configs/accelerate/fsdp_cpu2.yaml)."""
    if fsdp:
        processes = 2
    cfg = "configs/accelerate/cpu2.yaml" if processes == 2 else "configs/accelerate/cpu.yaml"
    cfg = "configs/accelerate/fsdp_cpu2.yaml" if fsdp else cfg
    cmd = [*ACCELERATE_LAUNCH, "--config_file", cfg]
    if processes == 2:  # a free port per test: parallel or back-to-back runs must not collide
        cmd += ["--main_process_port", str(free_port())]
    cmd += ["-m", module, *args]
    extra = {"ACCELERATE_USE_CPU": "1"} if processes == 2 else {}
    # The launcher sets the FSDP variables from the config it is given: none may leak in from this process (a stage
    # called in-process records its FSDP decision in os.environ).
    base_env = {k: v for k, v in os.environ.items() if k not in FSDP_ENV}
    if processes == 1:
        return run_as_group(cmd, timeout, {**base_env, **extra, **(env or {})})
    import shutil
    import tempfile

    # torch's launcher left a torchelastic_* folder in the temp folder at each launch: one of ours, deleted after
    logs = tempfile.mkdtemp(prefix="torchelastic_")
    at = cmd.index("--config_file") + 2
    cmd[at:at] = ["--log_dir", logs]
    try:
        return run_as_group(cmd, timeout, {**base_env, **extra, **(env or {})})
    finally:
        shutil.rmtree(logs, ignore_errors=True)


def run_as_group(cmd: list[str], timeout: int, env: dict) -> subprocess.CompletedProcess:
    """subprocess.run in a session of its own: on a timeout the launcher and every process below it are killed.
    torch's launcher starts each rank in a session of its own, so killing the launcher's group alone would leave two
    hung ranks holding the output pipes: the test would then wait for them forever."""
    import signal

    import psutil

    with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # Stopped first, so that no rank can start between the search below and the kill (a rank started then
            # survived, in a session of its own: seen once in a full suite under load).
            os.killpg(proc.pid, signal.SIGSTOP)
            below = psutil.Process(proc.pid).children(recursive=True)  # found before the launcher dies and they move
            os.killpg(proc.pid, signal.SIGKILL)
            for child in below:
                try:
                    child.kill()
                except psutil.NoSuchProcess:
                    pass
            proc.communicate()
            # A killed process reads as running until the kernel has torn it down, after it closed the pipes: under
            # load the caller could still see it (seen once in CI). Those whose parent died are reaped by init, or
            # stay zombies where init does not reap: either way dead.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and any(_alive(child) for child in below):
                time.sleep(0.05)
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _alive(process) -> bool:
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def on_device(devices, device) -> bool:
    """Every one of `devices` is `device`, as torch places tensors: PartialState().device on a GPU is `cuda`, and a
    tensor moved there is on `cuda:0`."""
    import torch

    want = torch.device(device)
    return all(torch.device(d).type == want.type and (torch.device(d).index or 0) == (want.index or 0) for d in devices)


FSDP_ENV = ("PIPELINE_FSDP", "ACCELERATE_USE_FSDP", "FSDP_VERSION")


@pytest.fixture(autouse=True)
def _fsdp_env_restored():
    """pipeline.sharding writes its FSDP decision into os.environ; no test may pass it on to the next one."""
    saved = {k: os.environ.get(k) for k in FSDP_ENV}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def guarded_exit(main_fn, capsys) -> tuple[int, str]:
    """(exit code, stderr) of main_fn run through pipeline.run.main_guard in this process, as a stage's `__main__`
    runs it (`main_guard(lambda: main(*parse_args()))`): a fresh process adds only the imports."""
    from pipeline.run import main_guard

    with pytest.raises(SystemExit) as exit_info:
        main_guard(main_fn)
    return exit_info.value.code, capsys.readouterr().err


def recorded_fsyncs(monkeypatch) -> list[str]:
    """Every path os.fsync is called on, in order, as the path was at the call (a folder renamed later keeps its
    old name here)."""
    calls, fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd))[1])
    return calls


def run_python(module: str, args: list[str], timeout: int = 600, env: dict | None = None):
    return subprocess.run([PYTHON, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def tiny_models_bf16(tiny_models, tmp_path_factory):
    """arch -> a model profile with `dtype: bfloat16` on the same tiny model folders as `tiny_models`."""
    import yaml

    root = tmp_path_factory.mktemp("profiles_bf16")
    profiles = {}
    for arch, path in tiny_models.items():
        spec = yaml.safe_load(Path(path).read_text())
        profiles[arch] = root / f"{arch}.yaml"
        profiles[arch].write_text(yaml.safe_dump({**spec, "dtype": "bfloat16"}))
    return profiles


# A Llama whose config.json names a model type transformers does not know, with its classes in the folder (auto_map):
# as a Hub checkpoint with its own code, it loads only with trust_remote_code.
CUSTOM_CONFIG_PY = """from transformers import LlamaConfig


class TinyConfig(LlamaConfig):
    model_type = "tiny_custom"
"""
CUSTOM_MODELING_PY = """from transformers import AutoModel, LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel

from .configuration_tiny import TinyConfig


class TinyModel(LlamaModel):
    config_class = TinyConfig


class TinyForCausalLM(LlamaForCausalLM):
    config_class = TinyConfig


class TinyForSequenceClassification(LlamaForSequenceClassification):
    config_class = TinyConfig

    def __init__(self, config):  # its body comes from AutoModel, which knows no config class of a remote module
        AutoModel.register(type(config), TinyModel, exist_ok=True)
        super().__init__(config)
"""


@pytest.fixture(scope="session")
def custom_code_model(tokenizer_dir, tmp_path_factory):
    """A model profile (trust_remote_code: true) on a tiny Llama that carries its own modeling code."""
    import json

    root = tmp_path_factory.mktemp("custom_code")
    model_dir = build_tiny_model("llama", tokenizer_dir, root / "tiny_custom")
    (model_dir / "configuration_tiny.py").write_text(CUSTOM_CONFIG_PY)
    (model_dir / "modeling_tiny.py").write_text(CUSTOM_MODELING_PY)
    config = json.loads((model_dir / "config.json").read_text())
    config["model_type"] = "tiny_custom"
    config["auto_map"] = {"AutoConfig": "configuration_tiny.TinyConfig", "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM",
                          "AutoModelForSequenceClassification": "modeling_tiny.TinyForSequenceClassification"}
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    profile = root / "tiny_custom.yaml"
    profile.write_text(f"name_or_path: {model_dir}\nlora_target_modules: {LLAMA_TARGETS}\ntrust_remote_code: true\n")
    return profile


# ---------------------------------------------------------------------------------------------------- real templates
# Real chat templates (TRL ships the checkpoints' own files in trl/chat_templates/) on tokenizers trained here, with
# the special tokens each family uses. `stop` is what the checkpoint's generation_config lists as eos_token_id.
SMOLLM2_TEMPLATE = (  # HuggingFaceTB/SmolLM2-*-Instruct: ChatML that TRL does not know; pad == eos
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou "
    "are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3_TOKENS = dict(bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None,
                     other=["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|end_of_text|>", "<|python_tag|>"],
                     stop=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], end_of_turn="<|eot_id|>", adds_bos=True)
QWEN_TOKENS = dict(bos=None, eos="<|im_end|>", pad="<|endoftext|>", other=["<|im_start|>", "<think>", "</think>"],
                   stop=["<|im_end|>", "<|endoftext|>"], end_of_turn="<|im_end|>")
GEMMA_TOKENS = dict(bos="<bos>", eos="<eos>", pad="<pad>", other=["<start_of_turn>", "<end_of_turn>"],
                    stop=["<eos>", "<end_of_turn>"], end_of_turn="<end_of_turn>", adds_bos=True)
PHI3_TOKENS = dict(bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>", other=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
                   stop=["<|endoftext|>", "<|assistant|>", "<|end|>"], end_of_turn="<|end|>")
REAL_TEMPLATES = {
    "llama3": dict(file="llama3.jinja", **LLAMA3_TOKENS),
    "llama3_1": dict(file="llama3_1.jinja", **LLAMA3_TOKENS),
    "llama3_2": dict(file="llama3_2.jinja", **LLAMA3_TOKENS),
    "qwen2_5": dict(file="qwen2_5.jinja", **QWEN_TOKENS),
    "qwen2_5_pad_is_eos": dict(file="qwen2_5.jinja", **{**QWEN_TOKENS, "pad": "<|im_end|>",
                                                        "other": [*QWEN_TOKENS["other"], "<|endoftext|>"]}),
    "qwen3": dict(file="qwen3.jinja", **QWEN_TOKENS),
    "qwen3_instruct_2507": dict(file="qwen3_instruct_2507.jinja", **QWEN_TOKENS),
    "smollm2_chatml": dict(file=None, **{**QWEN_TOKENS, "pad": "<|im_end|>", "stop": ["<|im_end|>"]}),
    "gemma": dict(file="gemma.jinja", **GEMMA_TOKENS),
    "gemma3": dict(file="gemma3.jinja", **GEMMA_TOKENS),
    "phi3": dict(file="phi3.jinja", **PHI3_TOKENS),
    "phi3_5": dict(file="phi3_5.jinja", **PHI3_TOKENS),
}


def yaml_with(text: str, extra: str) -> str:
    """A YAML file's text with `extra`'s top-level keys set: their old lines (and a value's indented or `- ` lines
    below) taken out and `extra` appended. A key given twice is refused (pipeline.config.UniqueKeyLoader), so a test
    cannot override a shipped config's key by appending it."""
    import re

    import yaml

    keys = set(yaml.safe_load(extra) or {})
    kept, skipping = [], False
    for line in text.splitlines():
        top = re.match(r"^([A-Za-z_]\w*)\s*:", line)
        if top:
            skipping = top.group(1) in keys
        elif line and not line[0].isspace() and not line.startswith("-"):
            skipping = False  # a comment at the margin: the value above has ended
        if not skipping:
            kept.append(line)
    return "\n".join(kept) + "\n" + extra


def template_text(name: str) -> str:
    import trl

    spec = REAL_TEMPLATES[name]
    return SMOLLM2_TEMPLATE if spec["file"] is None else (Path(trl.__file__).parent / "chat_templates" / spec["file"]).read_text()


def bos_first(bos: str, bos_id: int):
    """A tokenizers post-processor that puts BOS before the text, as real Llama 3 and Gemma tokenizers have: text the
    chat template already begins with BOS gets a second one unless encoded with add_special_tokens=False."""
    from tokenizers import processors

    return processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])


def build_template_tokenizer(name: str, out: Path) -> Path:
    """A byte-level BPE trained on one book, with this family's special tokens and its real chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from stages.base import clean

    spec = REAL_TEMPLATES[name]
    roles = {k: spec[k] for k in ("bos", "eos", "pad") if spec[k]}
    specials = list(dict.fromkeys([*roles.values(), *spec["other"]]))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([clean((REPO / "data/pretrain/texts/bunny.txt").read_text())],
                            trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if spec.get("adds_bos"):  # as Llama 3's and Gemma's do: encoding text (add_special_tokens) puts BOS first
        tok.post_processor = bos_first(spec["bos"], tok.token_to_id(spec["bos"]))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, **{f"{k}_token": v for k, v in roles.items()},
                                      additional_special_tokens=[t for t in specials if t not in roles.values()])
    wrapped.chat_template = template_text(name)
    wrapped.save_pretrained(out)
    return out


def tiny_tokenizer_with(name: str, tmp_path):
    """The tiny model's tokenizer, a BPE of the books the story data comes from (about as few tokens a word as a real
    checkpoint's, more for the templates' dates), with this family's special tokens and its real chat template."""
    from transformers import AutoTokenizer

    spec = REAL_TEMPLATES[name]
    tok = AutoTokenizer.from_pretrained(REPO / "models" / "tiny")
    specials = [t for t in (spec["bos"], spec["eos"], spec["pad"], *spec["other"]) if t]
    tok.add_special_tokens({"additional_special_tokens": list(dict.fromkeys(specials))})
    tok.eos_token, tok.chat_template = spec["eos"], template_text(name)
    if spec.get("adds_bos"):
        tok.bos_token = spec["bos"]
        tok._tokenizer.post_processor = bos_first(spec["bos"], tok.convert_tokens_to_ids(spec["bos"]))
    tok.save_pretrained(tmp_path / name)
    return AutoTokenizer.from_pretrained(tmp_path / name)


def build_template_model(name: str, tokenizer_dir: Path, out: Path) -> Path:
    """A tiny random Llama for this tokenizer; generation_config lists the family's stop tokens, as real checkpoints do."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                               tie_word_embeddings=False, initializer_range=0.3, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=pad)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, pad_token_id=pad,
                                               eos_token_id=tok.convert_tokens_to_ids(REAL_TEMPLATES[name]["stop"]))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def template_tokenizers(tmp_path_factory):
    """template name -> folder of a tokenizer carrying that real chat template."""
    root = tmp_path_factory.mktemp("template_tokenizers")
    return {name: build_template_tokenizer(name, root / name) for name in REAL_TEMPLATES}


@pytest.fixture(scope="session")
def template_models(tmp_path_factory, template_tokenizers):
    """template name -> model profile of a tiny Llama with that tokenizer (built on first use of a name)."""
    root = tmp_path_factory.mktemp("template_models")

    class Profiles(dict):
        def __missing__(self, name):
            model_dir = build_template_model(name, template_tokenizers[name], root / name)
            profile = root / f"{name}.yaml"
            profile.write_text(f"name_or_path: {model_dir}\nlora_target_modules: {LLAMA_TARGETS}\n")
            self[name] = profile
            return profile

    return Profiles()
