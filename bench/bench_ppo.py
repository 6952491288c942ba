"""PPO benchmark: our stage (stages/ppo) against TRL 1.12's PPOTrainer (LoRA path), same models and workload.

    make bench-ppo                                   # tiny (2 rounds x 12 updates), 125m (1 x 2), story (3 x 8)
    python -m bench.bench_ppo --scales story --rounds 3 --output /tmp/ppo.json       # the gold gain only
    python -m bench.bench_ppo --scales tiny --rounds 3 --output /tmp/ppo.json
    python -m bench.bench_ppo --ours-only --scales micro --output /tmp/x.json     # harness smoke test, no TRL venv

The peer (bench/peer/, copied from the shared peer-baselines scripts) runs in its own venv bench/.venv-trl112
(created once here: torch==2.13.0 first, pinned CPU wheel, then trl==1.12.0 and the same peft/transformers/
accelerate/datasets releases as ours). Both sides load the same base models, built once per scale by
bench/peer/peer_common.py into bench/out/models/<scale> (tokenizer, 256 prompts, policy base).

Equal work: same prompts, episodes per update (batch), micro-batch 8 with grad-accum batch/8, 4 PPO epochs x 1
mini-batch, response length 32 with no stop token, temperature 0.7, lr 3e-6 (--lr to change), kl_coef 0.05, fp32,
LoRA r=16/alpha 32 on all 7 projections for the policy, same number of updates; round r uses seed 42 + r - 1 on
both sides.
Same reward function: our reward model is a seeded LoRA SEQ_CLS adapter on the policy base (carrying the peer reward
model's `score` head); the peer gets that very model merged into a standalone one (bench/run_ours.py checks the two
score alike) as its reward model and as its value model's start; both read the prompt's and the policy's token ids
(ours with reward_input tokens: re-templating the decoded reply would also score the text after an EOS, which the
gold never reads since its samples stop there). reward_gain = the least-squares slope of the
per-update mean score x (updates - 1), computed here from each side's per-update scores.
story scale (issue 11): the story task's models of bench-rl (bench/story.py: models/tiny, SFT and reward adapters
from the real stages; the peer gets them merged, and the prompts chat-templated), lr 1e-3; each trained policy's
gold gain on the held-out story prompts is measured by the harness as in bench-rl (bench/harness.py add_gold:
sentiment judge, before = the SFT policy, paired samples, SE over rounds).
Not equal by design: TRL 1.12 holds separate full value and reward models (value fully trained); ours is one frozen
base with four LoRA adapters (policy, reference, value, reward), the value adapter training its top layer.

Each side runs as a separate subprocess, rounds alternate the order (ours first, then peer first, ...);
peak_rss_mb is the child's ru_maxrss from os.wait4 (the harness measures both sides the same way).
episodes_per_s / gen_tokens_per_s: episodes (and generated tokens) over training wall time, excluding imports and
model loading (peer: trainer.train(); ours: the sum of update times). Medians over rounds are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import (GoldEval, add_gold, env, gain_verdict, gold_summary, logger, meta, paired_ratios,
                           run_child, speed_memory_ratio, summarise)
from bench.story import base_of
from pipeline.config import REPO_ROOT
from pipeline.run import atomic_write_json

BENCH = REPO_ROOT / "bench"
PEER_DIR = BENCH / "peer"
OUT = BENCH / "out"
VENV = BENCH / ".venv-trl112"
PEER_PINS = ["trl==1.12.0", "peft==0.21.2", "transformers==5.24.0", "accelerate==1.15.0", "datasets==5.2.0"]
# Per scale: episodes per update, micro-batch, updates, default rounds.
SCALES = {
    "tiny": dict(batch_size=32, per_device_batch=8, updates=12, rounds=2),
    "125m": dict(batch_size=8, per_device_batch=8, updates=2, rounds=1),  # "a few updates are enough for memory"
    "micro": dict(batch_size=8, per_device_batch=4, updates=2, rounds=1),  # harness smoke test only
    # The story task (bench/story.py, shared with bench-rl): gold gain over seeds (issue 11), at the bench lr 1e-3
    "story": dict(batch_size=32, per_device_batch=8, updates=8, rounds=3, gold_samples=4, lr=1e-3),
}
GOLD = dict(response_length=32, temperature=0.7, gold_seed=1234, gold_judge="sentiment")
COMMON = dict(ppo_epochs=4, response_length=32, temperature=0.7, lr=3e-6, kl_coef=0.05, seed=42, lora_r=16, precision="fp32")
TARGETS = {"episodes_per_s_ratio_min": 1.5, "peak_rss_ratio_max_125m": 0.6, "reward_gain": ">= peer"}
METRICS = ("episodes_per_s", "gen_tokens_per_s", "peak_rss_mb", "reward_gain", "reward_gain_se")
log = logger("bench-ppo")


def ensure_peer_venv(python: str | None) -> str:
    """The TRL 1.12 interpreter: --peer_python if given, else bench/.venv-trl112 (created once)."""
    if python:
        return python
    py = VENV / "bin" / "python"
    check = [str(py), "-c", "import trl, sys; sys.exit(trl.__version__ != '1.12.0')"]
    if py.exists() and subprocess.run(check, env=env(), capture_output=True).returncode == 0:
        return str(py)
    log(f"creating {VENV} (once): torch==2.13.0 first (CPU wheel), then {' '.join(PEER_PINS)}")
    if not py.exists():
        subprocess.run(["python3", "-m", "venv", str(VENV)], check=True)
    pip = [str(VENV / "bin" / "pip"), "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)  # first and pinned: else a multi-GB CUDA torch
    subprocess.run(pip + PEER_PINS, check=True)
    subprocess.run(check, env=env(), check=True)
    return str(py)


def story_dirs(from_run: str | None = None) -> tuple[Path, Path]:
    """The story task's work folder (built once by bench/story.py, shared with bench-rl: models/tiny, the SFT and
    reward adapters from the real stages, or `from_run`'s) and the peer's folder made from it (merged SFT policy;
    merged reward model as reward and value model; the training prompts chat-templated)."""
    work, peer = OUT / "rl" / "story", OUT / "models" / "story-peer"
    run_child([sys.executable, "-m", "bench.story", "build", "--scale", "story", "--work", str(work),
               *(["--from_run", from_run] if from_run else [])], OUT / "logs" / "story-build.log", want_json=False)
    run_child([sys.executable, "-m", "bench.story", "ppo-peer", "--work", str(work), "--peer", str(peer)],
              OUT / "logs" / "story-ppo-peer.log", want_json=False)
    return work, peer


def build_models(scale: str) -> Path:
    model_dir = OUT / "models" / scale
    if not (model_dir / "BUILD_INFO.json").exists():
        log(f"building the {scale} models into {model_dir}")
        subprocess.run([sys.executable, str(PEER_DIR / "peer_common.py"), "build", "--dir", str(model_dir),
                        "--scale", scale], cwd=REPO_ROOT, env=env(), check=True, stdout=subprocess.DEVNULL)
    return model_dir


def set_lr(lr: float) -> None:
    """--lr: every scale's learning rate, the story scale's own 1e-3 too (which once won over the flag, silently)."""
    COMMON["lr"] = lr
    for scale in SCALES.values():
        scale["lr"] = lr


def side_args(s: dict, rnd: int) -> list[str]:
    """Round r runs both sides with seed 42 + r - 1: the reward gain is a median over different samples."""
    lr = s.get("lr", COMMON["lr"])
    return ["--updates", str(s["updates"]), "--batch-size", str(s["batch_size"]),
            "--per-device-batch", str(s["per_device_batch"]), "--ppo-epochs", str(COMMON["ppo_epochs"]),
            "--response-length", str(COMMON["response_length"]), "--temperature", str(COMMON["temperature"]),
            "--lr", str(lr), "--kl-coef", str(COMMON["kl_coef"]), "--seed", str(COMMON["seed"] + rnd - 1)]


def _line(scores: list[float]) -> tuple[float, float]:
    """Least-squares line through (update index, mean score): (slope, standard error of the slope)."""
    n = len(scores)
    xm, ym = (n - 1) / 2, sum(scores) / n
    sxx = sum((i - xm) ** 2 for i in range(n))
    slope = sum((i - xm) * (y - ym) for i, y in enumerate(scores)) / sxx
    resid = sum((y - ym - slope * (i - xm)) ** 2 for i, y in enumerate(scores))
    return slope, ((resid / (n - 2) / sxx) ** 0.5 if n > 2 else float("nan"))


def fitted_gain(scores: list[float] | None) -> float | None:
    """Reward gain over a run = least-squares slope of the per-update mean scores x (updates - 1).

    Both sides get the same arithmetic. Last-minus-first compares two single updates of 32 sampled episodes, which
    is mostly sampling noise at 12 updates; the fitted line uses every update."""
    if not scores or len(scores) < 2:
        return None
    return round(_line(scores)[0] * (len(scores) - 1), 4)


def fitted_gain_se(scores: list[float] | None) -> float | None:
    """Standard error of fitted_gain, from the residuals of the line: a gain within ~2 SE of 0 is sampling noise."""
    if not scores or len(scores) < 3:
        return None
    return round(_line(scores)[1] * (len(scores) - 1), 4)


def side_result(res: dict, rss: float, wall: float) -> dict:
    """One side's run, measured the same way for both: speed from its JSON line, memory from wait4, gain from scores."""
    scores = res.get("scores") or []
    return {"episodes_per_s": res["episodes_per_s"], "gen_tokens_per_s": res["gen_tokens_per_s"], "peak_rss_mb": round(rss, 1),
            "reward_gain": fitted_gain(scores), "reward_gain_se": fitted_gain_se(scores),
            "reward_last_minus_first": round(scores[-1] - scores[0], 4) if scores else None,
            "process_wall_s": round(wall, 2), "detail": res}


def prepare_ours(scale: str, model_dir: Path) -> Path:
    """Our adapters, profile, prompts and the merged reward model for the peer (bench/run_ours.py prepare), once."""
    work = OUT / "ours" / scale
    run_child([sys.executable, "-m", "bench.run_ours", "prepare", "--model-dir", str(model_dir), "--work", str(work)],
              OUT / "logs" / f"{scale}-ours-prepare.log", want_json=False)
    return work


def run_ours(scale: str, work: Path, s: dict, rnd: int) -> dict:
    # The reward model reads the policy's tokens, as the peer's does (query + all 32 response tokens, no stop):
    # reading the decoded reply re-templated instead, ours scored text after an EOS that the gold never reads.
    cmd = [sys.executable, "-m", "bench.run_ours", "run", "--model-dir", str(work), "--work", str(work),
           "--run", f"ppo-r{rnd}", "--reward-input", "tokens"] + side_args(s, rnd)
    r = side_result(*run_child(cmd, OUT / "logs" / f"{scale}-ours-r{rnd}.log"))
    r["policy"] = [str(base_of(work)), r["detail"]["adapter"]] if scale == "story" else None
    return r


def peer_model_dir(scale: str, model_dir: Path) -> Path:
    """The peer's model folder (after prepare_ours): the shared policy base and prompts, and our reward model merged
    into a standalone one as its reward and value model (TRL 1.12 starts the value model from the reward model, as
    we do)."""
    ours = OUT / "ours" / scale
    peer = OUT / "models" / f"{scale}-peer"
    peer.mkdir(parents=True, exist_ok=True)
    links = {"policy": model_dir / "policy", "reward": ours / "peer_reward", "value": ours / "peer_reward",
             "prompts.json": model_dir / "prompts.json", "BUILD_INFO.json": model_dir / "BUILD_INFO.json"}
    for name, target in links.items():
        link = peer / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target.resolve())
    return peer


def run_peer(scale: str, peer_dir: Path, s: dict, rnd: int, python: str) -> dict:
    saved = OUT / "peer_trl112" / f"{scale}-policy-r{rnd}"
    cmd = [python, str(PEER_DIR / "peer_ppo_trl112.py"), "--lora", "--model-dir", str(peer_dir),
           "--out-dir", str(OUT / "peer_trl112" / scale), "--save-policy", str(saved)] + side_args(s, rnd)
    r = side_result(*run_child(cmd, OUT / "logs" / f"{scale}-peer-r{rnd}.log"))
    r["policy"] = [str(peer_dir / "policy"), str(saved)]
    return r


def bench_scale(scale: str, rounds: int, peer_python: str | None, ours_only: bool, from_run: str | None = None) -> dict:
    s = SCALES[scale]
    if scale == "story":
        work, model_dir = story_dirs(from_run)
        peer_dir = model_dir
    else:
        model_dir = build_models(scale)
        work = prepare_ours(scale, model_dir)
        peer_dir = None if ours_only else peer_model_dir(scale, model_dir)
    info = json.loads((model_dir / "BUILD_INFO.json").read_text())
    ours, peer = [], []
    for rnd in range(1, rounds + 1):
        order = ["ours", "peer"] if rnd % 2 else ["peer", "ours"]
        for side in order:
            if side == "peer" and ours_only:
                continue
            load = round(os.getloadavg()[0], 2)
            log(f"{scale} round {rnd}/{rounds}: {side} (load {load})")
            r = run_ours(scale, work, s, rnd) if side == "ours" else run_peer(scale, peer_dir, s, rnd, peer_python)
            r["round"], r["load_1m_start"], r["load_1m_end"] = rnd, load, round(os.getloadavg()[0], 2)
            log(f"  {side}: {r['episodes_per_s']} ep/s, {r['gen_tokens_per_s']} gen tok/s, {r['peak_rss_mb']} MB, "
                f"reward gain {r['reward_gain']}, {r['process_wall_s']} s")
            (ours if side == "ours" else peer).append(r)
    metrics = METRICS
    if scale == "story":  # gold gain of every trained policy on the held-out story prompts (bench/harness.py)
        sides = {"ours": ours} if ours_only else {"ours": ours, "peer": peer}
        add_gold(sides, GoldEval(work, s["gold_samples"], GOLD), OUT, "story-ppo", log)
        metrics = METRICS + ("gold_gain", "kl_to_sft")
    settings = {**COMMON, **s, "rounds": rounds, "episodes_per_run": s["batch_size"] * s["updates"],
                "grad_accum": s["batch_size"] // s["per_device_batch"], "num_mini_batches": 1, "stop_token": None,
                "policy_params": info["policy_params"], "peer_reward_params": info["reward_params"],
                "arch": {k: info[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "vocab_size")}}
    summary = (lambda runs: gold_summary(runs, metrics)) if scale == "story" else (lambda runs: summarise(runs, metrics))
    res = {"settings": settings, "ours": summary(ours)}
    if not ours_only:
        res["peer"] = summary(peer)
        res["peer"]["name"] = "trl 1.12.0 trl.experimental.ppo.PPOTrainer, peft_config=LoRA (policy, value, reward)"
        res["ours"]["name"] = "stages.ppo (one frozen base, 4 LoRA adapters)"
        ratio = speed_memory_ratio(res["ours"], res["peer"])
        for key in ("episodes_per_s", "peak_rss_mb"):
            ratio.update(paired_ratios(ours, peer, key))
        # "reward gain >= the peer's": each side's median gain and median SE of its runs' gains (a run's SE: of its
        # reward-vs-update slope)
        ratio.update(gain_verdict(res["ours"], res["peer"], "reward_gain", mean="reward_gain"))
        ratio["meets_episodes_per_s_target"] = ratio["episodes_per_s"] is not None and ratio["episodes_per_s"] >= 1.5
        if scale == "story":
            ratio.update(gain_verdict(res["ours"], res["peer"]))
        if scale == "125m":
            ratio["meets_peak_rss_target"] = ratio["peak_rss_mb"] is not None and ratio["peak_rss_mb"] <= 0.6
        res["ratio"] = ratio
    return res


def parse_bench_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scales", default="tiny,125m,story", help="Comma list of tiny, 125m, story, micro.")
    p.add_argument("--rounds", type=int, default=None, help="Rounds at tiny and story (default 2, 3); 125m and micro run 1.")
    p.add_argument("--updates", type=int, default=None, help="Updates per run at every scale (default: the scale's).")
    p.add_argument("--ours-only", action="store_true", help="Skip the peer (and its venv): harness smoke test.")
    p.add_argument("--peer_python", default=None, help="A python with trl==1.12.0 (default: bench/.venv-trl112, made once).")
    p.add_argument("--lr", type=float, default=None, help=f"Learning rate for both sides at every scale (default {COMMON['lr']}, the story's {SCALES['story']['lr']}).")
    p.add_argument("--output", default=str(BENCH / "results" / "ppo.json"))
    p.add_argument("--from_run", default=None, help="story: the SFT policy and reward model of a finished run "
                   "(e.g. runs/default after `make sft rm`) instead of training them again (as bench-rl's).")
    p.add_argument("--work_dir", default=str(OUT), help="Models, logs and run folders (default bench/out, git-ignored).")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    global OUT
    a = parse_bench_args(argv)
    OUT = Path(a.work_dir).resolve()
    from_run = str(Path(a.from_run).resolve()) if a.from_run else None
    if a.lr is not None:
        set_lr(a.lr)
    t0 = time.perf_counter()
    scales = [x.strip() for x in a.scales.split(",") if x.strip()]
    for sc in scales:
        if sc not in SCALES:
            raise SystemExit(f"unknown scale {sc!r}: choose from {sorted(SCALES)}")
    peer_python = None if a.ours_only else ensure_peer_venv(a.peer_python)
    result: dict = {}
    peer_versions = None
    if peer_python:
        code = ("import json, platform, torch, trl, transformers, peft, accelerate, datasets; print(json.dumps({'python': "
                "platform.python_version(), 'torch': torch.__version__, 'trl': trl.__version__, 'transformers': "
                "transformers.__version__, 'peft': peft.__version__, 'accelerate': accelerate.__version__, "
                "'datasets': datasets.__version__}))")
        peer_versions = json.loads(subprocess.run([peer_python, "-c", code], env=env(), capture_output=True, text=True,
                                                  check=True).stdout.strip().splitlines()[-1])
    for sc in scales:
        if a.updates:
            SCALES[sc]["updates"] = a.updates
        rounds = a.rounds if (a.rounds and sc in ("tiny", "story")) else SCALES[sc]["rounds"]
        result[sc] = bench_scale(sc, rounds, peer_python, a.ours_only, from_run)
    result["meta"] = meta(TARGETS, t0, versions_peer=peer_versions, ours_only=a.ours_only, peer_python=peer_python)
    atomic_write_json(Path(a.output), result)
    log(f"wrote {a.output} in {result['meta']['wall_s']} s")
    for sc in scales:
        r = result[sc]
        line = f"{sc}: ours " + ", ".join(f"{k} {r['ours'][k]}" for k in METRICS)
        if "peer" in r:
            line += " | peer " + ", ".join(f"{k} {r['peer'][k]}" for k in METRICS) + f" | ratio {r['ratio']}"
        print(line)
    return result


if __name__ == "__main__":
    main()
