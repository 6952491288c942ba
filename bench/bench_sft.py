"""SFT throughput: our stage (`make sft`) against TRL's own `trl sft`, same model, data and hyper-parameters.

    make bench-sft                     # 5 rounds x 60 steps of configs/sft.yaml on models/tiny -> bench/results/sft.json
    python -m bench.bench_sft --rounds 1 --max_steps 3 --model_config x.yaml --output /tmp/sft.json [stage overrides]

Any further `--key value` is a stage override (as in `make sft ARGS=...`); it reaches both sides.

How the two sides are made equal:
- ours runs under accelerate's own launcher, as the Makefile runs it (`python -m accelerate.commands.launch
  --config_file configs/accelerate/cpu.yaml -m stages.sft --config configs/sft.yaml --run ...`); `trl sft` gets
  `--accelerate_config` with the same file. configs/sft.yaml and the model profile are copied once at the start and
  every run reads the copies (the repo may change meanwhile).
- TRL's config is derived from the stage's *resolved* config: every SFTConfig key set in configs/sft.yaml or on the
  command line (lr, scheduler, warmup, batch, steps, max_length, assistant_only_loss, optim, seed, ...), the LoRA
  r/alpha/dropout and target modules of the model profile, and the base model and dtype.
- TRL's data is the exact rows our stage trains on (the stage's own load_data + train/eval split, same seed), written
  as <dir>/train.jsonl (`--dataset_name` must be a folder). Equal work is checked: every run must
  report the same num_input_tokens_seen and both sides of a round the same train loss, or the bench exits non-zero.
- Rounds alternate the order (ours first, then TRL first, ...) so a load change on the shared machine hits both.

tokens/s = num_input_tokens_seen / train_runtime, both read from the final metrics dict that transformers' Trainer
prints when train() ends: the same code on both sides, and it times train() only (not imports, model loading,
dataset tokenization, our before/after generations or eval). The whole command's wall time is recorded beside it.
"""

from __future__ import annotations

import argparse
import ast
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.config import REPO_ROOT
from pipeline.launch import ACCELERATE_LAUNCH
from pipeline.run import atomic_write_json, git_commit, package_versions

STAGE_CONFIG = "configs/sft.yaml"
ACCELERATE_CONFIG = "configs/accelerate/cpu.yaml"
TARGET_RATIO = 0.95
BIN = Path(sys.executable).parent
# One thread per process: on the shared 2-core box torch's default threading is many times slower.
ENV_DEFAULTS = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_DISABLE_TELEMETRY": "1"}
FINAL_METRICS = re.compile(r"\{'train_runtime': [^{}]*\}")  # the dict Trainer logs at the end of train()


def parse_bench_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # More, shorter rounds rather than few long ones: on the shared 2-core box the load shifts within minutes,
    # and each alternation puts both sides under the same load. tokens/s is flat after the first step.
    p.add_argument("--rounds", type=int, default=5, help="Rounds; each runs both sides once, order alternating.")
    p.add_argument("--max_steps", type=int, default=60, help="Training steps per run (0: configs/sft.yaml's).")
    p.add_argument("--model_config", default=None, help="Model profile YAML (default: configs/sft.yaml's, the tiny base).")
    p.add_argument("--output", default="bench/results/sft.json", help="Result JSON (repo-relative or absolute).")
    p.add_argument("--workdir", default=None, help="Scratch folder (default: a temp folder, removed at the end).")
    p.add_argument("--timeout", type=int, default=1800, help="Seconds allowed for one run of one side.")
    bench, overrides = p.parse_known_args(argv)
    if bench.rounds < 1:
        p.error("--rounds must be at least 1")
    if bench.max_steps:
        overrides += ["--max_steps", str(bench.max_steps)]
    if bench.model_config is not None:
        overrides += ["--model_config", str(Path(bench.model_config).resolve())]
    # tokens/s is read from the Trainer's own count; "true" = "all": every input_ids position of each padded batch.
    overrides += ["--include_num_input_tokens_seen", "true"]
    return bench, overrides


def snapshot_configs(overrides: list[str], work: Path) -> tuple[Path, list[str], str]:
    """Copies of the stage config and the model profile that every run reads: the repo is shared and may be edited
    during a long benchmark, and a config changed between rounds would compare unequal work."""
    from pipeline.config import resolve_path
    from stages.sft import parse_args

    _, _, run_args = parse_args(["--config", STAGE_CONFIG, *overrides])
    config = work / "sft.yaml"
    shutil.copyfile(REPO_ROOT / STAGE_CONFIG, config)
    profile = work / "model_profile.yaml"
    shutil.copyfile(resolve_path(run_args.model_config), profile)
    return config, [*overrides, "--model_config", str(profile)], run_args.model_config


def trl_config(stage_config: Path, overrides: list[str], data_dir: Path, out_dir: Path) -> tuple[dict, dict]:
    """(the YAML for `trl sft --config`, a summary of the settings) from the stage's own resolved config."""
    from trl import SFTConfig

    from pipeline.config import read_yaml
    from pipeline.models import profile_from, resolve_base
    from stages.sft import parse_args

    train_cfg, sft_args, run_args = parse_args(["--config", str(stage_config), *overrides])
    set_keys = set(read_yaml(stage_config)) | {a[2:].split("=")[0] for a in overrides if a.startswith("--")}
    sft_fields = set(SFTConfig.__dataclass_fields__) - {"output_dir"}
    resolved = train_cfg.to_dict()
    profile = profile_from(run_args.model_config)
    cfg = {k: resolved[k] for k in sorted(set_keys & sft_fields)}
    # `trl sft --config` turns YAML values back into command-line strings: give them in the form its parser takes.
    if "include_num_input_tokens_seen" in cfg:
        cfg["include_num_input_tokens_seen"] = {"all": True, "no": False}[cfg["include_num_input_tokens_seen"]]
    if cfg.get("report_to") == []:
        cfg["report_to"] = "none"
    cfg.update(
        model_name_or_path=resolve_base(profile.name_or_path), dtype=profile.dtype,
        trust_remote_code=profile.trust_remote_code, load_in_4bit=profile.load_in_4bit,
        use_peft=True, lora_r=sft_args.lora_r, lora_alpha=sft_args.lora_alpha, lora_dropout=sft_args.lora_dropout,
        lora_target_modules=list(profile.lora_target_modules), dataset_name=str(data_dir), output_dir=str(out_dir),
        # Both sides launch with configs/accelerate/cpu.yaml, but transformers' Trainer reads its own use_cpu (our
        # stage's parse sets it from the launch): without it, on a machine with a GPU TRL trained there, ours on CPU.
        use_cpu=True,
    )
    if profile.chat_template:  # TRL reads a template file (or a tokenizer's), not the text a profile may hold
        from pipeline.models import template_text

        template = Path(out_dir).parent / "chat_template.jinja"
        template.parent.mkdir(parents=True, exist_ok=True)
        template.write_text(template_text(profile.chat_template))
        cfg["chat_template_path"] = str(template)
    return cfg, {"train_cfg": train_cfg, "sft_args": sft_args, "run_args": run_args, "profile": profile}


def write_train_rows(resolved: dict, data_dir: Path) -> int:
    """The exact rows our stage trains on (its own loader and split, same seed) as data_dir/train.jsonl."""
    from pipeline.data import train_eval_split
    from stages.sft import load_data

    seed = resolved["train_cfg"].seed
    ds, _ = load_data(resolved["sft_args"], seed)
    train_ds, _ = train_eval_split(ds, resolved["sft_args"].eval_fraction, seed)
    train_ds = train_ds.select_columns(["messages"])  # not the file row numbers the stage keeps for its errors
    data_dir.mkdir(parents=True, exist_ok=True)
    train_ds.to_json(str(data_dir / "train.jsonl"))
    return len(train_ds)


def final_metrics(output: str) -> dict:
    """The last end-of-train metrics dict in a run's output (values are printed as '%.4g' strings)."""
    found = FINAL_METRICS.findall(output)
    if not found:
        return {}
    return {k: float(v) for k, v in ast.literal_eval(found[-1]).items()}


def summary(rounds: list[dict]) -> dict:
    """The figures and the verdict over rounds: each side's median tokens/s, their ratio (ours / trl) and the median
    of the per-round ratios; the target is judged only when both sides did the same work (the same tokens in every
    run, the same train loss on both sides of each round), else None."""
    ours = statistics.median(e["ours"]["tokens_per_s"] for e in rounds)
    trl = statistics.median(e["trl"]["tokens_per_s"] for e in rounds)
    ratio = round(ours / trl, 4)
    same_tokens = len({e[s]["num_input_tokens_seen"] for e in rounds for s in ("ours", "trl")}) == 1
    same_loss = all(e["ours"]["train_loss"] == e["trl"]["train_loss"] for e in rounds)
    return {"ours_tokens_per_s": ours, "trl_tokens_per_s": trl, "ratio": ratio,
            "meets_target": ratio >= TARGET_RATIO if same_tokens and same_loss else None,
            "median_of_round_ratios": round(statistics.median(e["ratio"] for e in rounds), 4),
            "same_tokens_every_run": same_tokens, "same_train_loss_each_round": same_loss}


def run_side(name: str, cmd: list[str], env: dict, timeout: int) -> dict:
    load_before = os.getloadavg()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"bench: {name} ran past --timeout {timeout}s: {' '.join(cmd)}") from None
    wall = time.time() - t0
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    metrics = final_metrics(proc.stdout)
    if proc.returncode != 0 or not metrics.get("num_input_tokens_seen") or not metrics.get("train_runtime"):
        raise SystemExit(f"bench: {name} failed (exit {proc.returncode}, final metrics {metrics or 'not found'}):\n"
                         f"  {' '.join(cmd)}\n--- last output ---\n{proc.stdout[-4000:]}")
    return {
        "tokens_per_s": round(metrics["num_input_tokens_seen"] / metrics["train_runtime"], 1),
        "num_input_tokens_seen": int(metrics["num_input_tokens_seen"]),
        "train_runtime_s": metrics["train_runtime"],
        "train_steps_per_second": metrics.get("train_steps_per_second"),
        "train_loss": metrics.get("train_loss"),
        "wall_s": round(wall, 2),
        # CPU seconds of the whole command (imports, loading, tokenizing, training; ours also samples and evals):
        # wall against CPU shows how much of a slow run was waiting for a core.
        "cpu_s": round(cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime, 2),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv=None) -> dict:
    bench, overrides = parse_bench_args(argv)
    env = {**os.environ, **{k: v for k, v in ENV_DEFAULTS.items() if k not in os.environ}}
    os.environ.update({k: env[k] for k in ENV_DEFAULTS})
    started = time.time()
    load_start = os.getloadavg()
    work = Path(bench.workdir).resolve() if bench.workdir else Path(tempfile.mkdtemp(prefix="bench_sft_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        stage_config, overrides, model_config = snapshot_configs(overrides, work)
        cfg, resolved = trl_config(stage_config, overrides, work / "data", work / "trl_out")
        rows = write_train_rows(resolved, work / "data")
        import yaml

        trl_yaml = work / "trl_sft.yaml"
        trl_yaml.write_text(yaml.safe_dump(cfg, sort_keys=False))
        accelerate_config = str(REPO_ROOT / ACCELERATE_CONFIG)
        runs_dir = work / "runs"

        def ours_cmd(r):
            return [*ACCELERATE_LAUNCH, "--config_file", accelerate_config, "-m", "stages.sft", "--config", str(stage_config),
                    "--run", f"bench-sft-{r}", "--runs_dir", str(runs_dir), *overrides]

        trl_cmd = [str(BIN / "trl"), "sft", "--config", str(trl_yaml), "--accelerate_config", accelerate_config]

        rounds = []
        for r in range(1, bench.rounds + 1):
            order = ("ours", "trl") if r % 2 else ("trl", "ours")
            entry = {"round": r, "order": list(order)}
            for side in order:
                cmd = ours_cmd(r) if side == "ours" else trl_cmd
                print(f"[bench-sft] round {r}/{bench.rounds}: {side} ...", flush=True)
                entry[side] = run_side(side, cmd, env, bench.timeout)
                print(f"[bench-sft]   {entry[side]['tokens_per_s']} tok/s, train {entry[side]['train_runtime_s']} s, "
                      f"load {entry[side]['loadavg_before'][0]}", flush=True)
            manifest = runs_dir / f"bench-sft-{r}" / "sft" / "manifest.json"
            if manifest.is_file():  # the stage's own figure (time.time() around train()): a cross-check
                import json

                entry["ours"]["stage_manifest_tokens_per_s"] = json.loads(manifest.read_text())["metrics"].get("tokens_per_s")
            entry["ratio"] = round(entry["ours"]["tokens_per_s"] / entry["trl"]["tokens_per_s"], 4)
            rounds.append(entry)
            shutil.rmtree(runs_dir / f"bench-sft-{r}", ignore_errors=True)
    finally:
        if not bench.workdir:
            shutil.rmtree(work, ignore_errors=True)

    verdict = summary(rounds)
    ours, trl, ratio = verdict["ours_tokens_per_s"], verdict["trl_tokens_per_s"], verdict["ratio"]
    same_tokens, same_loss = verdict["same_tokens_every_run"], verdict["same_train_loss_each_round"]
    train_cfg = resolved["train_cfg"]
    result = {
        "benchmark": "sft: stages/sft.py (make sft) against `trl sft`, same model, data and hyper-parameters",
        "metric": ("tokens/s = num_input_tokens_seen / train_runtime, both from the final metrics dict transformers' "
                   "Trainer logs when train() ends, on both sides (include_num_input_tokens_seen="
                   f"{cfg['include_num_input_tokens_seen']!r}: every input_ids position of each padded batch; "
                   "train_runtime covers train() only). Median over rounds."),
        "target_ratio": TARGET_RATIO,
        **verdict,
        "rounds": rounds,
        "settings": {
            "rounds": bench.rounds,
            "max_steps": train_cfg.max_steps,
            "order": "alternating: odd rounds ours first, even rounds trl first",
            "stage_config": f"{STAGE_CONFIG} (copied at the start; every run reads the copy)",
            "model_config": model_config,
            "base_model": cfg["model_name_or_path"],
            "base_parameters": count_parameters(cfg["model_name_or_path"]),
            "train_rows": rows,
            "stage_overrides": shown(overrides, work).split(" "),
            "trl_config": {k: v for k, v in cfg.items() if k not in ("dataset_name", "output_dir")},
            "ours_command": shown(ours_cmd("<round>"), work),
            "trl_command": shown(trl_cmd, work),
            "env": {k: env[k] for k in ENV_DEFAULTS},
        },
        "machine": {
            "cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "loadavg_start": [round(x, 2) for x in load_start], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "note": "2 cores shared with other jobs; the loadavg per run is in rounds[]",
        },
        "versions": package_versions(),
        "git_commit": git_commit(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "duration_s": round(time.time() - started, 1),
    }
    out = Path(bench.output)
    out = out if out.is_absolute() else REPO_ROOT / out
    atomic_write_json(out, result)
    print(f"\n== bench-sft ({bench.rounds} rounds, {train_cfg.max_steps} steps) ==\n"
          f"  ours  {ours:9.1f} tok/s\n  trl   {trl:9.1f} tok/s\n  ratio {ratio:9.3f}  (target >= {TARGET_RATIO})\n"
          f"  -> {out}")
    if not (same_tokens and same_loss):
        raise SystemExit("bench: the two sides did not do the same work (tokens or train loss differ, see rounds[] in "
                         f"{out}): the comparison is void")
    return result


def shown(cmd: list[str], work: Path) -> str:
    return " ".join(cmd).replace(str(work), "<tmp>").replace(str(REPO_ROOT) + "/", "")


def count_parameters(path: str) -> int | None:
    try:
        from safetensors import safe_open

        total = 0
        for f in Path(path).glob("*.safetensors"):
            with safe_open(str(f), "pt") as st:
                for k in st.keys():
                    shape = st.get_slice(k).get_shape()
                    n = 1
                    for d in shape:
                        n *= d
                    total += n
        return total or None
    except Exception:  # a Hub id or another format: the figure is informative only
        return None


if __name__ == "__main__":
    main()
