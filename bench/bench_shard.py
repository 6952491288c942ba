"""What sharding PPO's frozen base saves each rank: PPO on two CPU processes, data parallel (cpu2.yaml) against FSDP2
(fsdp_cpu2.yaml), on a random-init Llama large enough that its weights outweigh the fixed cost of a process.

    make bench-shard                                              # bench/results/shard.json
    python -m bench.bench_shard --hidden 256 --layers 2 --rounds 1 --output /tmp/shard.json   # a quick look

Same run on both sides (seeds, prompts, adapters, 2 updates), launched as `make ppo` launches it; rounds alternate
which side goes first. Per side: each rank's peak resident memory (the manifest's `peak_memory_mb_per_rank`, the
rank's ru_maxrss at its end: loading included), the base elements each rank holds and the storage behind them, and
episodes/s. `same_metrics`: every logged figure of the two runs equal to rel 1e-5 (sharding must not change the
numbers). Medians over rounds.

`load`: the loading alone (`pipeline.models.load_base`, as every stage loads the base), whole on each rank or
sharded, in the checkpoint's dtype (fp32: a whole load maps the file, whose pages the ranks share) and in bf16 (cast
as read, as a profile's `dtype` asks): each rank's peak and resident memory right after the load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.adapters import PROJ, seeded_sft_and_reward
from stages.ppo.trainer import TIMING_KEYS

REPO = Path(__file__).resolve().parents[1]
SIDES = {"ddp": "configs/accelerate/cpu2.yaml", "fsdp": "configs/accelerate/fsdp_cpu2.yaml"}


def build(work: Path, hidden: int, layers: int, seed: int = 0) -> dict:
    """A random-init fp32 Llama with the embedded base's tokenizer and chat template, a fresh SFT LoRA (B = 0) and a
    seeded SEQ_CLS reward LoRA on it, a model profile and 64 story prompts. Built once per size."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    if (work / "DONE").exists():
        return json.loads((work / "DONE").read_text())
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tok = AutoTokenizer.from_pretrained(REPO / "models" / "tiny")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 8 * 8,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64), max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(config)
    base.save_pretrained(work / "base")
    tok.save_pretrained(work / "base")
    numel = base.num_parameters()
    del base
    (work / "profile.yaml").write_text(f"name_or_path: {(work / 'base').resolve()}\nlora_target_modules: {PROJ}\n"
                                       "dtype: float32\ndescription: bench-shard random-init Llama\n")
    seeded_sft_and_reward((work / "base").resolve(), work, dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=PROJ),
                          seed)
    rows = [json.loads(line) for line in (REPO / "data/story/ppo_prompts.jsonl").read_text().splitlines()[:64]]
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = {"base_numel": numel, "hidden": hidden, "layers": layers, "weight_mb_fp32": round(numel * 4 / 2**20, 1)}
    (work / "DONE").write_text(json.dumps(info))
    return info


def run_side(side: str, work: Path, run: str, updates: int) -> dict:
    """One PPO run under the side's accelerate config, as `make ppo` launches it; its manifest's figures."""
    from pipeline.launch import ACCELERATE_LAUNCH, free_port

    cmd = [*ACCELERATE_LAUNCH, "--config_file", SIDES[side], "--num_processes", "2", "--mixed_precision", "no",
           "--main_process_port", str(free_port()), "-m", "stages.ppo", "--config", "configs/ppo.yaml",
           "--run", run, "--runs_dir", str(work / "runs"), "--model_config", str(work / "profile.yaml"),
           "--sft_adapter", str(work / "sft"), "--reward_adapter", str(work / "rm"),
           "--dataset_name", str(work / "prompts.jsonl"), "--heldout_fraction", "0", "--total_updates", str(updates),
           "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--response_length", "16",
           "--save_every", "0", "--sample_every", "0", "--keep_policy_every", "0", "--progress_bar", "false",
           "--auto_resume", "false", "--seed", "42"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log = work / f"{run}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{side} run failed (rc {done.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    stage = work / "runs" / run / "ppo"
    m = json.loads((stage / "manifest.json").read_text())["metrics"]
    logged = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"side": side, "wall_s": round(time.perf_counter() - t0, 1), "world_size": m["world_size"],
            "base_sharded": m["base_sharded"], "peak_memory_mb_per_rank": m["peak_memory_mb_per_rank"],
            "base_numel_per_rank": m["base_numel_per_rank"], "base_stored_numel_per_rank": m["base_stored_numel_per_rank"],
            "episodes_per_s": m["episodes_per_s"],
            # every logged figure but the timings (a key holding "_s" dropped reward_std, a figure made across ranks)
            "logged": [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in logged]}


def probe_load(profile: str) -> None:
    """One rank of the `load` measurement (run under accelerate): load the base as the stages do, print one JSON line."""
    import resource

    from pipeline.models import load_base, load_tokenizer, profile_from
    from pipeline.sharding import process_state, take_over_from_accelerate

    shard = take_over_from_accelerate()
    state = process_state()
    prof = profile_from(profile)
    load_base(prof, load_tokenizer(prof), shard=shard)
    resident = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rank": state.process_index, "sharded": shard, "peak_mb": round(peak, 1),
                      "resident_mb": round(resident, 1)}), flush=True)


def load_side(side: str, profile: Path) -> list[dict]:
    """Every rank's memory after loading the base under the side's accelerate config."""
    from pipeline.launch import ACCELERATE_LAUNCH, free_port

    cmd = [*ACCELERATE_LAUNCH, "--config_file", SIDES[side], "--num_processes", "2", "--mixed_precision", "no",
           "--main_process_port", str(free_port()), "-m", "bench.bench_shard", "--probe_load", str(profile)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{side} load probe failed (rc {done.returncode}):\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return sorted(rows, key=lambda r: r["rank"])


def same_figures(a: list[dict], b: list[dict]) -> bool:
    """Every logged figure of run a equal to run b's (rel 1e-5)."""
    if len(a) != len(b):
        return False
    for ra, rb in zip(a, b):
        if ra.keys() != rb.keys():
            return False
        for k, va in ra.items():
            vb = rb[k]
            if isinstance(va, float) and isinstance(vb, float):
                if abs(va - vb) > 1e-5 * max(abs(va), abs(vb), 1e-2):
                    return False
            elif va != vb:
                return False
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--updates", type=int, default=2)
    ap.add_argument("--work", default=str(REPO / "bench" / "out" / "shard"))
    ap.add_argument("--output", default=str(REPO / "bench" / "results" / "shard.json"))
    ap.add_argument("--probe_load", help=argparse.SUPPRESS)  # one rank of the load measurement
    a = ap.parse_args(argv)
    if a.probe_load:
        probe_load(a.probe_load)
        return 0
    t0 = time.time()
    work = Path(a.work) / f"h{a.hidden}-l{a.layers}"
    info = build(work, a.hidden, a.layers)
    print(f"base: {info['base_numel']:,} weights ({info['weight_mb_fp32']} MB in fp32)", file=sys.stderr)
    bf16 = work / "profile-bf16.yaml"
    bf16.write_text((work / "profile.yaml").read_text().replace("dtype: float32", "dtype: bfloat16"))
    load = {}
    for dtype, profile in (("float32", work / "profile.yaml"), ("bfloat16", bf16)):
        for side in SIDES:
            load[f"{side} {dtype}"] = load_side(side, profile)
            print(f"load {side} {dtype}: {load[f'{side} {dtype}']}", file=sys.stderr)
    runs = {side: [] for side in SIDES}
    for r in range(a.rounds):
        order = list(SIDES) if r % 2 == 0 else list(SIDES)[::-1]
        for side in order:
            res = run_side(side, work, f"{side}-r{r}", a.updates)
            print(f"round {r + 1} {side}: peak MB per rank {res['peak_memory_mb_per_rank']}, "
                  f"{res['episodes_per_s']:.2f} episodes/s", file=sys.stderr)
            runs[side].append(res)
    summary = {}
    for side, rs in runs.items():
        summary[side] = {
            "peak_memory_mb_per_rank_median": [statistics.median(r["peak_memory_mb_per_rank"][i] for r in rs) for i in range(2)],
            "episodes_per_s_median": statistics.median(r["episodes_per_s"] for r in rs),
            "base_numel_per_rank": rs[0]["base_numel_per_rank"],
            "base_stored_numel_per_rank": rs[0]["base_stored_numel_per_rank"],
            "world_size": rs[0]["world_size"], "base_sharded": rs[0]["base_sharded"]}
    ddp_peak, fsdp_peak = (max(summary[s]["peak_memory_mb_per_rank_median"]) for s in ("ddp", "fsdp"))
    out = {"bench": "shard", "date": time.strftime("%Y-%m-%d"), "wall_s": round(time.time() - t0, 1), "model": info,
           "rounds": a.rounds, "updates": a.updates, "load": load, "summary": summary,
           "saved_mb_per_rank": round(ddp_peak - fsdp_peak, 1),
           "same_metrics": all(same_figures(d["logged"], f["logged"]) for d, f in zip(runs["ddp"], runs["fsdp"])),
           "runs": {side: [{k: v for k, v in r.items() if k != "logged"} for r in rs] for side, rs in runs.items()}}
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("model", "load", "summary", "saved_mb_per_rank", "same_metrics")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
