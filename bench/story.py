"""The story task's models for the RL benchmarks (make bench-rl), built once into a work folder.

    python -m bench.story build --scale story --work bench/out/rl/story    # the real stages, small (~10 min on 2 cores)
    python -m bench.story build --scale micro --work /tmp/micro            # harness smoke test: seeded random adapters

story: models/tiny as the base, and a real SFT policy and reward model made by the pipeline's own stages on the
story recipe (configs/sft.yaml, pairs.yaml, simulate.yaml, label.yaml, rm.yaml) with fewer steps and prompts
(STORY_STAGE_ARGS), into <work>/runs/bench/. micro: a 2-layer random Llama with the tiny model's tokenizer and chat
template, a seeded LoRA SFT adapter and a seeded SEQ_CLS reward adapter, summing as configs/rm.yaml's (harness checks
only; nothing is learnt).

Either way the folder ends in the layout bench/run_ours.py reads (profile.yaml, sft/, rm/, prompts.jsonl) plus
what the peer and the gold evaluation need: heldout.jsonl (story prompts neither side trains on), peer_policy/
(the SFT adapter merged into a standalone causal LM: the peer's starting policy and, adapter disabled, its
reference) and peer_reward/ (the reward adapter merged into a standalone sequence classifier, the peer's
reward_funcs, with the adapter's score_pooling.json: peer_common.pool_reward_model applies it). Merging is checked:
the merged models must give the adapters' logits.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.config import REPO_ROOT

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = REPO_ROOT / "data" / "story" / "ppo_prompts.jsonl"
HELDOUT_FRACTION = 0.2  # as configs/ppo.yaml: 82 of the 413 story prompts are only ever used by the gold evaluation
SPLIT_SEED = 42
# The story chain as `make sft rm` runs it (configs/*.yaml as they are): the bench's reward model is the default run's.
# A smaller chain (SFT 60 steps, pairs on 160 prompts, RM 120 steps) left the reward model at chance on its held-out
# labels (0.47), so the gold gains measured how far each side moved, not what it learnt. Keys are the stages' flags.
# One reward model, not make rm's ensemble: both sides of a bench are rewarded by the same single model (the peer's
# reward_funcs is it merged), and --from_run takes a run's first member.
STORY_STAGE_ARGS: dict[str, list[str]] = {"sft": [], "pairs": [], "simulate": [], "label.export": [],
                                          "rm": ["--ensemble", "1"]}
STAGE_CONFIGS = {"sft": "sft", "pairs": "pairs", "simulate": "simulate", "label.export": "label", "rm": "rm"}


def split_prompts(work: Path, source: Path = PROMPTS, limit: int | None = None) -> None:
    """prompts.jsonl (training) and heldout.jsonl (gold evaluation): one seeded split, the same for every side and
    round (the stage's own held-out split moves with its seed, so the bench passes heldout_fraction 0)."""
    rows = [ln for ln in source.read_text().splitlines() if ln.strip()]
    order = list(range(len(rows)))
    random.Random(SPLIT_SEED).shuffle(order)
    n_held = int(len(rows) * HELDOUT_FRACTION)
    held = sorted(order[:n_held])[:limit]
    train = sorted(order[n_held:])
    (work / "heldout.jsonl").write_text("".join(rows[i] + "\n" for i in held))
    (work / "prompts.jsonl").write_text("".join(rows[i] + "\n" for i in train))


def run_stages(work: Path) -> tuple[Path, Path]:
    """The story chain through the real stages (each its own process, as make runs them); (sft adapter, rm adapter)."""
    runs = work / "runs"
    for module, extra in STORY_STAGE_ARGS.items():
        cmd = [sys.executable, "-m", f"stages.{module}", "--config", f"configs/{STAGE_CONFIGS[module]}.yaml",
               "--run", "bench", "--runs_dir", str(runs), *extra]
        print(f"story build: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
        subprocess.run(cmd, cwd=REPO_ROOT, check=True)
    return run_adapters(runs / "bench")


def run_adapters(run_dir: Path) -> tuple[Path, Path]:
    """(sft adapter, rm adapter) of a story run folder, from its manifests (an ensemble's first member); one clear
    error when it has none."""
    paths = []
    for stage in ("sft", "rm"):
        manifest = run_dir / stage / "manifest.json"
        if not manifest.is_file():
            raise SystemExit(f"error: {run_dir} has no finished {stage} stage ({manifest} is missing): run "
                             f"`make sft rm RUNS_DIR={run_dir.parent} RUN={run_dir.name}` first, or leave out --from_run")
        paths.append(Path(json.loads(manifest.read_text())["outputs"]["adapter"]))
    return paths[0], paths[1]


def micro_base(work: Path) -> Path:
    """A 2-layer random Llama on the tiny model's tokenizer (and chat template)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(REPO_ROOT / "models" / "tiny")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    base = work / "base"
    LlamaForCausalLM(cfg).save_pretrained(base)
    tok.save_pretrained(base)
    return base


def micro_adapters(work: Path, base_dir: Path) -> tuple[Path, Path]:
    """Seeded LoRA adapters in the stages' formats: a CAUSAL_LM policy and a SEQ_CLS reward model with a score head
    (random B, so the reward varies with the text)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.adapters import write_pooling
    from pipeline.models import save_fingerprint

    tok = AutoTokenizer.from_pretrained(base_dir)
    lora = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=PROJ)
    out = {}
    for name, cls, task in (("sft", AutoModelForCausalLM, "CAUSAL_LM"), ("rm", AutoModelForSequenceClassification, "SEQ_CLS")):
        torch.manual_seed(1 if name == "sft" else 2)
        model = cls.from_pretrained(base_dir, **({"num_labels": 1} if name == "rm" else {}))
        model.config.pad_token_id = tok.pad_token_id
        peft = get_peft_model(model, LoraConfig(task_type=task, init_lora_weights=False, **lora))
        out[name] = work / f"{name}_adapter"
        peft.save_pretrained(out[name])
        tok.save_pretrained(out[name])
        save_fingerprint(out[name], model.config, str(base_dir))
    write_pooling(out["rm"], "sum")  # as configs/rm.yaml trains them: the peers must score the same way
    return out["sft"], out["rm"]


def merged(base_dir: Path, adapter: Path, out: Path, kind: str, probe: list[list[dict]]) -> None:
    """`adapter` merged into a standalone copy of `base_dir` at `out`; refuses if the merged logits differ."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.adapters import read_pooling, write_pooling
    from pipeline.generation import chat_reward_inputs

    tok = AutoTokenizer.from_pretrained(adapter)
    if kind == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1)
        model.config.pad_token_id = tok.pad_token_id  # the adapter does not carry it
    else:
        model = AutoModelForCausalLM.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(model, adapter).eval()
    ids, mask, _ = chat_reward_inputs(tok, probe, ["Once upon a time they were happy."] * len(probe))
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        model = model.merge_and_unload()
        after = model(input_ids=ids, attention_mask=mask).logits
    if not torch.allclose(before, after, atol=1e-4):
        raise SystemExit(f"merging {adapter} changed its outputs (max diff {(before - after).abs().max():.2e})")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if kind == "reward":  # how the head's per-token outputs become one score: the peers read it (peer_common)
        write_pooling(out, read_pooling(adapter))


def base_of(work: Path) -> Path:
    """The base model folder the sft and rm adapters of a built work folder sit on."""
    return Path(json.loads((work / "BUILD_INFO.json").read_text())["base"])


def build(scale: str, work: Path, from_run: Path | None = None) -> None:
    """from_run: take the SFT policy and reward model of a finished story run (`make sft rm`) instead of training them."""
    wanted = {"scale": scale, "from_run": str(from_run) if from_run else None,
              "stage_args": STORY_STAGE_ARGS if scale == "story" and not from_run else None}
    if (work / "DONE").exists():
        info = json.loads((work / "BUILD_INFO.json").read_text())
        if all(info.get(k) == v for k, v in wanted.items()):
            return
        shutil.rmtree(work)  # built from another run or with other stage arguments: rebuild as asked
    taken = run_adapters(from_run) if from_run else None  # a run without them: its error before anything is written
    work.mkdir(parents=True, exist_ok=True)
    if scale == "story":
        base_dir = REPO_ROOT / "models" / "tiny"
        sft, rm = taken or run_stages(work)
        split_prompts(work)
    else:
        base_dir = micro_base(work)
        sft, rm = micro_adapters(work, base_dir)
        split_prompts(work, limit=8)
    for name, target in (("sft", sft), ("rm", rm)):
        link = work / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target.resolve())
    (work / "profile.yaml").write_text(f"name_or_path: {base_dir.resolve()}\nlora_target_modules: {PROJ}\ndtype: float32\n"
                                       f"description: bench-rl {scale} base\n")
    probe = [json.loads(ln)["prompt"] for ln in (work / "heldout.jsonl").read_text().splitlines()[:4]]
    for kind, adapter, out in (("policy", sft, work / "peer_policy"), ("reward", rm, work / "peer_reward")):
        shutil.rmtree(out, ignore_errors=True)
        merged(base_dir, adapter, out, kind, probe)
    (work / "BUILD_INFO.json").write_text(json.dumps({**wanted, "base": str(base_dir.resolve()),
                                                      "sft_adapter": str(sft), "rm_adapter": str(rm)}, indent=1))
    (work / "DONE").write_text("ok\n")


def n_params(safetensors_file: Path) -> int:
    from math import prod

    from safetensors import safe_open

    with safe_open(str(safetensors_file), "pt") as f:
        return sum(prod(f.get_slice(k).get_shape()) for k in f.keys())


def ppo_peer_folder(work: Path, peer: Path) -> None:
    """The folder TRL 1.12's PPO peer (bench/peer/peer_ppo_trl112.py) reads, for make bench-ppo's story scale: the
    merged SFT policy, the merged reward model as its reward and value model, and the training prompts
    chat-templated into text (it tokenizes plain strings without special tokens; the template's <s> and role
    headers are special tokens of the tokenizer, so the ids are the chat template's)."""
    from transformers import AutoConfig, AutoTokenizer

    peer.mkdir(parents=True, exist_ok=True)
    for name, target in (("policy", "peer_policy"), ("reward", "peer_reward"), ("value", "peer_reward")):
        link = peer / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to((work / target).resolve())
    tok = AutoTokenizer.from_pretrained(work / "peer_policy")
    rows = [json.loads(ln)["prompt"] for ln in (work / "prompts.jsonl").read_text().splitlines() if ln.strip()]
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in rows]
    (peer / "prompts.json").write_text(json.dumps(texts, indent=0))
    cfg = AutoConfig.from_pretrained(work / "peer_policy")
    arch = {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                         "vocab_size")}
    counts = {f"{d}_params": n_params(work / f"peer_{d}" / "model.safetensors") for d in ("policy", "reward")}
    (peer / "BUILD_INFO.json").write_text(json.dumps({"scale": "story", **arch, **counts}, indent=1))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cmd", choices=["build", "ppo-peer"])
    ap.add_argument("--scale", choices=["story", "micro"], default="story")
    ap.add_argument("--work", required=True)
    ap.add_argument("--peer", help="ppo-peer: the folder to write")
    ap.add_argument("--from_run", help="build: a finished story run folder (runs/default) whose sft and rm to use")
    a = ap.parse_args(argv)
    if a.cmd == "build":
        build(a.scale, Path(a.work).resolve(), Path(a.from_run).resolve() if a.from_run else None)
    else:
        ppo_peer_folder(Path(a.work).resolve(), Path(a.peer).resolve())


if __name__ == "__main__":
    main()
