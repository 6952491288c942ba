"""GRPO / RLOO benchmark: our RL loop (stages/ppo with configs/grpo.yaml, rloo.yaml) against TRL 1.16's
GRPOTrainer and RLOOTrainer, on the story task.

    make bench-rl                                           # story: 3 rounds x 8 updates per method
    python -m bench.bench_rl --methods grpo --rounds 1 --updates 4 --output /tmp/rl.json
    python -m bench.bench_rl --scale micro --output /tmp/x.json   # harness smoke test (random micro models)

Models (bench/story.py, built once into bench/out/rl/<scale>): models/tiny as base, an SFT policy and a reward
model from the pipeline's own stages at bench size. Ours stacks the SFT adapter (policy and reference) and the
reward adapter on models/tiny; the peer gets the SFT adapter merged into a standalone model (its LoRA starts at
B = 0, so both sides start from the same policy, and its adapter-disabled reference is the SFT policy, as ours)
and the reward adapter merged into a standalone sequence classifier as reward_funcs: one reward function.

Equal work, per method: the same training prompts (a fixed 80/20 split of data/story/ppo_prompts.jsonl), samples
per prompt (num_generations), episodes per update, response length 32 stopping at EOS, temperature 0.7, lr 1e-3
(linear decay, AdamW eps 1e-5, grad-norm clip 1.0), KL coefficient 0.05 (GRPO: k3 loss term, TRL's beta;
RLOO: sequence KL in the reward, TRL's beta), LoRA r 16 / alpha 32 on the 7 projections, fp32, dropout off, one
optimizer step per update, the same number of updates; round r uses seed 42 + r - 1 on both sides. The raw
reward-model score is the reward on both sides (no normalisation, clipping or EOS penalty).
Batch mapping (TRL to ours): generation_batch_size = episodes per update = per_device_train_batch_size x
gradient_accumulation_steps x num_mini_batches (1); steps_per_generation = gradient_accumulation_steps, so one
generation feeds exactly one optimizer step (TRL's _step counts micro-batches and regenerates every
steps_per_generation x num_iterations of them); num_iterations 1 = num_ppo_epochs 1; num_generations =
num_samples_per_prompt; max_steps = updates.
Not equal by design: TRL's RLOO takes a sequence-level ratio and averages the loss per sequence; ours, and TRL's
GRPO (loss_type "dapo"), average per token over the batch. The peer's LoRA is fresh (B = 0) on the merged SFT
model; ours trains the SFT adapter itself (as `make grpo` does), so it moves further per step. TRL re-templates the
decoded completion for the reward model as is; ours strips surrounding whitespace first (pipeline.generation), so
a reply that starts with a space gets one token fewer in the reward model's input.

Gold gain: the harness samples 4 responses for each held-out prompt (82 story prompts neither side trained on)
from the SFT policy and from each trained policy, with one fixed seed, in its own process (bench/gold.py), and
scores them with the sentiment judge (VADER; pipeline/judges.py). gold_gain = mean(after) - mean(before), paired
by sample slot; medians over rounds, with the SE over rounds (seeds). kl_to_sft: the trained policy's KL to the SFT
policy on those samples, as `make eval` measures it (nats per response; the same measure for both sides, where the
trainers' own logs differ: TRL's `kl` is a per-token mean). Speed and memory: as bench-ppo
(bench/harness.py): episodes/s over training wall time, peak RSS = the child's ru_maxrss from os.wait4.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench.harness import (GoldEval, add_gold, gain_verdict, gold_summary, logger, meta, paired_ratios, run_child,
                           speed_memory_ratio)
from bench.story import base_of
from pipeline.config import REPO_ROOT
from pipeline.run import atomic_write_json

BENCH = REPO_ROOT / "bench"
OUT = BENCH / "out" / "rl"
log = logger("bench-rl")
METHODS = {"grpo": "configs/grpo.yaml", "rloo": "configs/rloo.yaml"}
SCALES = {
    "story": dict(batch_size=32, per_device_batch=16, samples_per_prompt=4, updates=8, rounds=3, gold_samples=4),
    "micro": dict(batch_size=8, per_device_batch=4, samples_per_prompt=2, updates=2, rounds=1, gold_samples=2),
}
COMMON = dict(response_length=32, temperature=0.7, lr=1e-3, kl_coef=0.05, seed=42, lora_r=16, lora_alpha=32,
              adam_epsilon=1e-5, num_iterations=1, gold_seed=1234, gold_judge="sentiment", precision="fp32")
TARGETS = {"episodes_per_s_ratio_min": 1.5, "peak_rss_ratio_max": 0.7, "gold_gain": ">= peer within SE"}
METRICS = ("episodes_per_s", "gen_tokens_per_s", "peak_rss_mb", "gold_gain", "kl_to_sft")


def build_models(scale: str, from_run: str | None = None) -> Path:
    work = OUT / scale
    run_child([sys.executable, "-m", "bench.story", "build", "--scale", scale, "--work", str(work),
               *(["--from_run", from_run] if from_run else [])], OUT / "logs" / f"{scale}-build.log", want_json=False)
    return work


def side_result(res: dict, rss: float, wall: float, policy: tuple[Path, Path]) -> dict:
    """One side's run, measured the same way for both: speed from its JSON line, memory from wait4; the trained
    policy (base, adapter) is gold-evaluated by the harness afterwards (harness.add_gold)."""
    return {"episodes_per_s": res["episodes_per_s"], "gen_tokens_per_s": res.get("gen_tokens_per_s"),
            "peak_rss_mb": round(rss, 1), "world_size": res.get("world_size"), "process_wall_s": round(wall, 2),
            "policy": [str(p) for p in policy], "detail": res}


def run_side(side: str, method: str, work: Path, s: dict, rnd: int) -> dict:
    seed = COMMON["seed"] + rnd - 1
    common = ["--updates", str(s["updates"]), "--batch-size", str(s["batch_size"]),
              "--per-device-batch", str(s["per_device_batch"]), "--response-length", str(COMMON["response_length"]),
              "--temperature", str(COMMON["temperature"]), "--lr", str(COMMON["lr"]),
              "--kl-coef", str(COMMON["kl_coef"]), "--seed", str(seed)]
    name = f"{work.name}-{method}-{side}-r{rnd}"
    if side == "ours":
        cmd = [sys.executable, "-m", "bench.run_ours", "run", "--model-dir", str(work), "--work", str(work),
               "--run", f"{method}-r{rnd}", "--config", METHODS[method], "--samples-per-prompt",
               str(s["samples_per_prompt"]), "--ppo-epochs", str(COMMON["num_iterations"]), "--stop-at-eos"] + common
    else:
        cmd = [sys.executable, str(BENCH / "peer" / "peer_rl_trl116.py"), "--method", method, "--work", str(work),
               "--out-dir", str(OUT / "peer_runs" / name), "--samples-per-prompt", str(s["samples_per_prompt"]),
               "--lora-r", str(COMMON["lora_r"]), "--lora-alpha", str(COMMON["lora_alpha"]),
               "--adam-epsilon", str(COMMON["adam_epsilon"])] + common
    res, rss, wall = run_child(cmd, OUT / "logs" / f"{name}.log")
    policy = ((base_of(work), Path(res["adapter"])) if side == "ours"
              else (work / "peer_policy", OUT / "peer_runs" / name / "policy"))
    return side_result(res, rss, wall, policy)


def rm_accuracy(work: Path) -> float | None:
    """The story reward model's held-out accuracy on its simulated labels (None for micro's random one): its own
    member's when its rm stage trained an ensemble (the stage's eval_accuracy is then the ensemble's)."""
    adapter = json.loads((work / "BUILD_INFO.json").read_text())["rm_adapter"]
    manifest = Path(adapter).parent / "manifest.json"
    if not manifest.exists():
        return None
    metrics = json.loads(manifest.read_text())["metrics"]
    own = [m for m in metrics.get("members") or [] if m.get("adapter") == adapter]
    return own[0]["eval_accuracy"] if own else metrics.get("eval_accuracy")


def bench_method(method: str, scale: str, work: Path, s: dict) -> dict:
    runs = {"ours": [], "peer": []}
    for rnd in range(1, s["rounds"] + 1):
        for side in (["ours", "peer"] if rnd % 2 else ["peer", "ours"]):
            load = round(os.getloadavg()[0], 2)
            log(f"{method} round {rnd}/{s['rounds']}: {side} (load {load})")
            r = run_side(side, method, work, s, rnd)
            r["round"], r["load_1m_start"], r["load_1m_end"] = rnd, load, round(os.getloadavg()[0], 2)
            log(f"  {side}: {r['episodes_per_s']} ep/s, {r['peak_rss_mb']} MB, {r['process_wall_s']} s")
            runs[side].append(r)
    before = add_gold(runs, GoldEval(work, s["gold_samples"], COMMON), OUT, f"{work.name}-{method}", log)
    res = {"settings": {"scale": scale, "method": method, "config": METHODS[method], **s, **COMMON,
                        "episodes_per_run": s["batch_size"] * s["updates"],
                        "prompts_per_update": s["batch_size"] // s["samples_per_prompt"],
                        "grad_accum": s["batch_size"] // s["per_device_batch"],
                        "trl_mapping": {"generation_batch_size": s["batch_size"],
                                        "per_device_train_batch_size": s["per_device_batch"],
                                        "gradient_accumulation_steps": s["batch_size"] // s["per_device_batch"],
                                        "steps_per_generation": s["batch_size"] // s["per_device_batch"],
                                        "num_generations": s["samples_per_prompt"], "num_iterations": 1,
                                        "max_steps": s["updates"]},
                        "build": json.loads((work / "BUILD_INFO.json").read_text()),
                        "rm_eval_accuracy": rm_accuracy(work),
                        "heldout_prompts": len((work / "heldout.jsonl").read_text().splitlines()),
                        "gold_before": round(sum(before) / len(before), 4)},
           "ours": gold_summary(runs["ours"], METRICS), "peer": gold_summary(runs["peer"], METRICS)}
    res["ours"]["name"] = f"stages.ppo advantage_estimator={method} (one frozen base, 3 LoRA adapters)"
    res["peer"]["name"] = f"trl {method.upper()}Trainer 1.16, peft_config=LoRA, reward_funcs=merged reward model"
    ratio = speed_memory_ratio(res["ours"], res["peer"])
    for key in ("episodes_per_s", "peak_rss_mb"):
        ratio.update(paired_ratios(runs["ours"], runs["peer"], key))
    ratio["meets_episodes_per_s_target"] = ratio["episodes_per_s"] is not None and ratio["episodes_per_s"] >= 1.5
    ratio["meets_peak_rss_target"] = ratio["peak_rss_mb"] is not None and ratio["peak_rss_mb"] <= 0.7
    res["ratio"] = {**ratio, **gain_verdict(res["ours"], res["peer"])}
    return res


def parse_bench_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", default="story", choices=sorted(SCALES))
    p.add_argument("--methods", default="grpo,rloo", help="Comma list of grpo, rloo.")
    p.add_argument("--rounds", type=int, default=None, help="Rounds (seeds) per method (default: the scale's).")
    p.add_argument("--updates", type=int, default=None, help="Updates per run (default: the scale's).")
    p.add_argument("--output", default=str(BENCH / "results" / "rl.json"))
    p.add_argument("--work_dir", default=str(OUT), help="Models, logs and run folders (default bench/out/rl, git-ignored).")
    p.add_argument("--from_run", default=None, help="story: the SFT policy and reward model of a finished run "
                   "(e.g. runs/default after `make sft rm`) instead of training them again (~7 min).")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    global OUT
    a = parse_bench_args(argv)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"error: --methods: unknown method {m!r}; choose from {sorted(METHODS)}")
    OUT = Path(a.work_dir).resolve()
    t0 = time.perf_counter()
    s = {**SCALES[a.scale], **({"rounds": a.rounds} if a.rounds else {}), **({"updates": a.updates} if a.updates else {})}
    work = build_models(a.scale, a.from_run)
    result = {m: bench_method(m, a.scale, work, s) for m in methods}
    result["meta"] = meta(TARGETS, t0, peer="trl (this venv)", methods=methods, scale=a.scale)
    atomic_write_json(Path(a.output), result)
    log(f"wrote {a.output} in {result['meta']['wall_s']} s")
    for m in methods:
        r = result[m]
        print(f"{m}: ours " + ", ".join(f"{k} {r['ours'][k]}" for k in METRICS) + f" (se {r['ours']['gold_gain_se']})"
              + " | peer " + ", ".join(f"{k} {r['peer'][k]}" for k in METRICS) + f" (se {r['peer']['gold_gain_se']})"
              + f" | ratio {r['ratio']}")
    return result


if __name__ == "__main__":
    main()
