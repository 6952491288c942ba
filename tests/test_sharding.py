"""FSDP2 (pipeline.sharding): two real CPU processes under configs/accelerate/fsdp_cpu2.yaml.

Each stage must (1) really shard: each rank holds about half of the frozen base, (2) give what DDP (or one process,
for the inference stages) gives on the same data and seed, (3) write adapters that stock peft loads."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline import sharding
from pipeline.config import ConfigError
from tests.conftest import REPO, run_module, yaml_with

# What "the same" means between an FSDP2 run and a DDP run of the same config: the same arithmetic on the same
# batches (each rank computes its micro-batch with the gathered weights; gradients are averaged over the 2 ranks in
# both). Seen: 0.0 on SFT and RM adapters. The bound leaves room for a different reduction order only.
ADAPTER_ATOL = 1e-6


def assert_really_sharded(metrics: dict) -> None:
    s = metrics["sharding"]
    assert metrics["world_size"] == 2 and s["engine"] == "fsdp2", s
    per_rank, full = s["base_numel_per_rank"], s["base_numel_full"]
    assert len(per_rank) == 2 and full > 10_000
    # Each rank holds its own half of every sharded weight; only a reward model's 1 x H score head stays whole.
    assert all(0.45 * full <= n <= 0.55 * full for n in per_rank), s
    assert full <= sum(per_rank) <= full + 64, s
    # and holds only that in memory: on the CPU each shard was a view of the whole weight as read (pipeline.sharding.
    # own_shards), so a rank held as much as under DDP (FSDP pads a shard a little: within the same bounds)
    assert all(0.45 * full <= n <= 0.55 * full for n in s["base_stored_numel_per_rank"]), s


def assert_same_adapter(dir_a: Path, dir_b: Path) -> None:
    a, b = (load_file(d / "adapter_model.safetensors") for d in (dir_a, dir_b))
    assert sorted(a) == sorted(b) and a
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= ADAPTER_ATOL, worst
    assert any(float(a[k].abs().max()) > 0 for k in a if "lora_B" in k)  # trained: B starts at zero


def manifest(runs_dir, run, stage) -> dict:
    return json.loads((runs_dir / run / stage / "manifest.json").read_text())


# ---------------------------------------------------------------------------------------------------- fast: the rules

def test_units_cover_every_weight_outside_the_root(tiny_models):
    """Each decoder layer, the trunk's other children (embeddings, final norm) and the head are units: the root keeps
    no weight, so a direct call of the trunk (reward and value heads) gathers what it uses."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.config import load_model_profile

    expected = {"llama": {"model.embed_tokens": "free_full_weight", "model.layers.*": "free_full_weight",
                          "model.norm": "free_full_weight", "lm_head": "keep_full_weight"},
                "gpt2": {"transformer.wte": "free_full_weight", "transformer.wpe": "free_full_weight",
                         "transformer.h.*": "free_full_weight", "transformer.ln_f": "free_full_weight",
                         "lm_head": "keep_full_weight"}}
    for arch, units in expected.items():
        path = load_model_profile(tiny_models[arch]).name_or_path
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
        assert sharding.fsdp_units(model) == units
        names = [re.compile(re.escape(unit).replace(r"\*", r"\d+") + "$") for unit in units]  # `*`: a layer's index
        covered = {id(p) for n, m in model.named_modules() if any(rx.match(n) for rx in names) for p in m.parameters()}
        assert {id(p) for p in model.parameters()} <= covered


def test_fsdp_version_1_is_refused_and_accelerate_fsdp_switched_off(monkeypatch):
    monkeypatch.delenv("PIPELINE_FSDP", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        sharding.take_over_from_accelerate()
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert sharding.take_over_from_accelerate() is False  # one process: nothing to shard over
    # accelerate must not build its own FSDP (a second wrap, its adapter-less SHARDED_STATE_DICT saving)
    assert os.environ["ACCELERATE_USE_FSDP"] == "false" and sharding.requested()
    monkeypatch.delenv("PIPELINE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert not sharding.requested()


def test_fsdp_is_off_unless_a_config_asks_and_one_without_a_version_is_version_1(monkeypatch):
    """No FSDP accelerate config (neither variable set): nothing is sharded. An FSDP config that names no fsdp_version
    is version 1 (accelerate's default): refused as version 1 is."""
    for name in ("PIPELINE_FSDP", "ACCELERATE_USE_FSDP", "FSDP_VERSION"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)  # restored after the test: take_over_from_accelerate sets some of them itself
    assert not sharding.requested() and sharding.take_over_from_accelerate() is False
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="FSDP version 1"):
        sharding.take_over_from_accelerate()


def test_a_launch_of_two_processes_shards_before_torch_distributed_starts(monkeypatch):
    """take_over_from_accelerate runs first thing in a stage's main(), before torch.distributed is initialised: the
    launch's WORLD_SIZE says how many ranks will share the base. Mutant: the variable ignored, one rank assumed, and an
    FSDP launch of two processes loaded the whole base on each (DDP under an FSDP config)."""
    import torch.distributed as dist

    assert not (dist.is_available() and dist.is_initialized())
    monkeypatch.delenv("PIPELINE_FSDP", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert sharding.world_size() == 2 and sharding.take_over_from_accelerate() is True
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert sharding.world_size() == 1 and sharding.take_over_from_accelerate() is False


def test_the_report_counts_each_ranks_elements_and_the_storage_behind_them():
    """sharding_report's two per-rank figures: the elements of the frozen base a rank holds, and the storage behind
    them (a shard that is a view of the whole weight holds the whole weight's memory: pipeline.sharding.own_shards).
    A 4-element weight viewed from a 10-element tensor: 4 held, 10 stored. Mutants: the storage counted as the view's
    elements; the two figures swapped in the report."""
    from torch import nn

    model = nn.Module()
    model.weight = nn.Parameter(torch.arange(10.0)[:4], requires_grad=False)
    assert model.weight.untyped_storage().nbytes() == 10 * 4
    assert sharding.local_numel(model) == (4, 4, 10)
    assert sharding.sharding_report(model) == {"engine": "none", "base_numel_full": 4, "base_numel_per_rank": [4],
                                               "base_stored_numel_per_rank": [10]}


def test_the_frozen_base_is_counted_without_a_frozen_adapters_tensors(tiny_models):
    """local_numel: the base's own weights only. A frozen adapter's LoRA matrices (PPO's reference) are not base, though
    nothing trains them; unsharded, each rank holds and stores the whole base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.config import load_model_profile

    profile = load_model_profile(tiny_models["llama"])
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(profile.name_or_path))
    base = sum(p.numel() for p in model.parameters())
    model = get_peft_model(model, LoraConfig(r=2, target_modules=list(profile.lora_target_modules)))
    model.requires_grad_(False)
    assert sum(p.numel() for p in model.parameters()) > base
    assert sharding.local_numel(model) == (base, base, base)


def test_only_a_linear_head_is_kept_whole():
    """keep_whole replaces a linear head by an equal plain copy; any other head is one ConfigError naming it."""
    from torch import nn

    model = nn.Module()
    model.score = nn.Sequential(nn.Linear(4, 1))
    with pytest.raises(ConfigError, match="'score' head of Module is a Sequential, not a linear layer"):
        sharding.keep_whole(model, "score")
    model.score = nn.Linear(4, 1)
    weight, bias = model.score.weight.detach().clone(), model.score.bias.detach().clone()
    whole = sharding.keep_whole(model, "score")
    assert whole is model.score and torch.equal(whole.weight, weight) and torch.equal(whole.bias, bias)


@pytest.mark.parametrize("world,n_batches,ran", [
    (2, 5, [[0, 2, 4], [1, 3, 4]]),         # rank 1 runs batch 4 again, only to stay in lockstep
    (3, 7, [[0, 3, 6], [1, 4, 6], [2, 5, 6]]),
    (3, 2, [[0], [1], [1]]),                # fewer batches than ranks: rank 2 repeats the last one
], ids=["2x5", "3x7", "3x2"])
def test_spread_runs_batch_b_on_rank_b_mod_n_and_keeps_no_repeat(world, n_batches, ran, monkeypatch):
    """pipeline.sharding.spread over `world` ranks (threads, with all_gather_object done by hand): batch b runs on rank
    b % world, every rank runs as many batches (a repeat of the last past the end), and every rank gets each batch's
    own result back in order, never a repeat's."""
    import threading

    import torch.distributed as dist

    local, barrier, parts = threading.local(), threading.Barrier(world, timeout=30), {}

    def all_gather_object(out, obj):
        parts[local.rank] = obj
        barrier.wait()
        out[:] = [parts[r] for r in range(world)]
        barrier.wait()

    monkeypatch.setattr(sharding, "rank_and_world", lambda: (local.rank, world))
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    seen, results, errors = {r: [] for r in range(world)}, {}, []

    def rank_main(rank):
        local.rank = rank
        try:
            results[rank] = sharding.spread(n_batches, lambda b: seen[rank].append(b) or (b, rank))
        except Exception as err:  # noqa: BLE001 - re-raised below, in the test's thread
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert [seen[r] for r in range(world)] == ran
    assert all(results[r] == [(b, b % world) for b in range(n_batches)] for r in range(world)), results


def test_4bit_base_cannot_be_sharded(tiny_models, tmp_path):
    from pipeline.models import load_base, load_tokenizer, profile_from

    profile = tmp_path / "q.yaml"
    profile.write_text(yaml_with(Path(tiny_models["llama"]).read_text(), "load_in_4bit: true\n"))
    prof = profile_from(str(profile))
    with pytest.raises(ConfigError, match="load_in_4bit cannot be combined with FSDP"):
        load_base(prof, load_tokenizer(prof), shard=True)


def test_shipped_accelerate_configs_are_listed_in_the_readme_with_their_test():
    """The README's hardware table lists exactly the shipped accelerate configs (no DeepSpeed: not supported)."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Hardware"):]
    section = section[: section.index("\n## ", 3)]
    shipped = sorted(p.name for p in (REPO / "configs/accelerate").glob("*.yaml"))
    listed = sorted(set(__import__("re").findall(r"`configs/accelerate/([\w.]+\.yaml)`", section)))
    assert listed == shipped and not [n for n in shipped if "zero" in n]
    for line in section.splitlines():
        if line.startswith("| `configs/accelerate/"):
            assert "tests/" in line, line  # each row names the test that shows it works


def test_gpu_fsdp_config_is_fsdp2_full_shard_by_layer():
    import yaml

    cfg = yaml.safe_load((REPO / "configs/accelerate/fsdp.yaml").read_text())
    fsdp = cfg["fsdp_config"]
    assert cfg["distributed_type"] == "FSDP" and fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and fsdp["fsdp_reshard_after_forward"] is True
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT" and fsdp["fsdp_cpu_ram_efficient_loading"] is False


# ---------------------------------------------------------------------------------------------------- slow: 2 processes

@pytest.mark.slow
def test_sft_fsdp2_shards_the_base_and_matches_ddp(tiny_models, runs_dir):
    from peft import AutoPeftModelForCausalLM

    from tests.test_sft import tiny_args

    common = ["--max_steps", "3", "--eval_fraction", "0", "--learning_rate", "2e-3", "--per_device_train_batch_size", "4",
              "--save_strategy", "steps", "--save_steps", "2"]  # a checkpoint, optimizer included (build_trainer)
    fsdp = run_module("stages.sft", tiny_args(tiny_models["llama"], runs_dir, "fsdp", *common), fsdp=True)
    assert fsdp.returncode == 0, fsdp.stderr[-4000:]
    assert "the checkpoints hold the model only" not in fsdp.stderr
    ddp = run_module("stages.sft", tiny_args(tiny_models["llama"], runs_dir, "ddp", *common), processes=2)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    m_fsdp, m_ddp = manifest(runs_dir, "fsdp", "sft")["metrics"], manifest(runs_dir, "ddp", "sft")["metrics"]
    assert_really_sharded(m_fsdp)
    assert m_ddp["sharding"]["engine"] == "none" and m_ddp["sharding"]["base_numel_per_rank"] == [m_ddp["sharding"]["base_numel_full"]] * 2
    assert m_fsdp["loss_curve"] == m_ddp["loss_curve"]
    adapter = runs_dir / "fsdp" / "sft" / "adapter"
    assert_same_adapter(adapter, runs_dir / "ddp" / "sft" / "adapter")
    # The before/after samples ran on the sharded model on both ranks: the same texts as DDP's
    assert (runs_dir / "fsdp/sft/samples.json").read_text() == (runs_dir / "ddp/sft/samples.json").read_text()
    model = AutoPeftModelForCausalLM.from_pretrained(str(adapter))  # stock peft, whole weights in the file
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0


@pytest.mark.slow
def test_rm_fsdp2_shards_the_base_and_matches_ddp(tiny_models, runs_dir, tmp_path):
    from peft import AutoPeftModelForSequenceClassification

    from tests.test_rm import fake_sft, marker_rows, rm_args, write_jsonl

    data = write_jsonl(tmp_path / "marker.jsonl", marker_rows(64))
    common = ["--dataset_name", str(data), "--max_steps", "4", "--per_device_train_batch_size", "4", "--eval_fraction", "0.25",
              "--ensemble", "2",  # the second member loads its own sharded base once the first is freed
              "--pooling", "last"]  # the loss reads the shared prefix pass only through its cache (sum: resume tests)
    for run, kw in (("fsdp", {"fsdp": True}), ("ddp", {"processes": 2})):
        fake_sft(tiny_models["llama"], runs_dir, run)
        res = run_module("stages.rm", rm_args(tiny_models["llama"], runs_dir, run, *common), **kw)
        assert res.returncode == 0, res.stderr[-4000:]
    m_fsdp, m_ddp = manifest(runs_dir, "fsdp", "rm")["metrics"], manifest(runs_dir, "ddp", "rm")["metrics"]
    assert_really_sharded(m_fsdp)
    assert m_fsdp["loss_curve"] == m_ddp["loss_curve"] and m_fsdp["eval_accuracy"] == m_ddp["eval_accuracy"]
    # The held-out scores of the sharded model (all ranks) came back from stock peft on a base sharded again (a base
    # that needs sharding may not fit on one device whole); under DDP from a fresh process
    assert m_fsdp["reload_check"]["max_abs_diff"] <= 1e-4 and m_fsdp["reload_check"]["pairs_flipped"] == 0
    assert [r["reload_check"]["sharded"] for r in m_fsdp["members"]] == [True, True]
    assert [r["reload_check"]["sharded"] for r in m_ddp["members"]] == [False, False]
    adapter = runs_dir / "fsdp" / "rm" / "adapter"
    assert_same_adapter(adapter, runs_dir / "ddp" / "rm" / "adapter")
    assert_same_adapter(runs_dir / "fsdp" / "rm" / "member-1" / "adapter", runs_dir / "ddp" / "rm" / "member-1" / "adapter")
    assert [r["eval_accuracy"] for r in m_fsdp["members"]] == [r["eval_accuracy"] for r in m_ddp["members"]]
    assert [r["reload_check"]["max_abs_diff"] <= 1e-4 for r in m_fsdp["members"]] == [True, True]
    assert "base_model.model.score.weight" in load_file(adapter / "adapter_model.safetensors")
    model = AutoPeftModelForSequenceClassification.from_pretrained(str(adapter), num_labels=1)
    assert model.base_model.model.score.modules_to_save["default"].weight.shape == (1, 32)


@pytest.mark.slow
def test_pairs_and_eval_fsdp2_give_what_one_process_gives(tiny_models, runs_dir, tmp_path):
    """Batches spread over the sharded ranks, an odd count (one rank repeats a batch to stay in lockstep), sampled
    per-batch seeds: the same pairs and the same eval report as one process."""
    import datasets

    from stages.eval import main as eval_main, parse_args as eval_args
    from stages.pairs import PairsArgs, main as pairs_main
    from pipeline.config import RunArgs, parse
    from pipeline.generation import SamplingConfig
    from tests.fake_upstream import build_upstream
    from tests.test_eval import add_kept_policies_and_rm_pairs

    profile = str(tiny_models["llama"])
    build_upstream(runs_dir, profile, "one")
    build_upstream(runs_dir, profile, "two")
    pairs = ["--config", "configs/pairs.yaml", "--runs_dir", str(runs_dir), "--model_config", profile,
             "--max_prompts", "5", "--max_new_tokens", "8", "--generation_batch_size", "4"]  # 10 rows: 3 batches
    res = run_module("stages.pairs", [*pairs, "--run", "two"], fsdp=True)
    assert res.returncode == 0, res.stderr[-4000:]
    pairs_main(*parse((PairsArgs, SamplingConfig, RunArgs), [*pairs, "--run", "one"]))
    one, two = (datasets.load_from_disk(str(runs_dir / r / "pairs/dataset")) for r in ("one", "two"))
    assert len(two) > 0 and two["pair_id"] == one["pair_id"] and two["responses"] == one["responses"]
    assert_really_sharded(manifest(runs_dir, "two", "pairs")["metrics"])

    ev = ["--config", "configs/eval.yaml", "--runs_dir", str(runs_dir), "--model_config", profile,
          "--max_new_tokens", "10", "--score_batch_size", "4"]  # 6 held-out prompts x 4 samples: 6 batches of each kind
    for run in ("one", "two"):  # the gold report's own forwards: kept policies and the RM's held-out pairs
        add_kept_policies_and_rm_pairs(runs_dir / run)
    res = run_module("stages.eval", [*ev, "--run", "two", "--generation_batch_size", "4"], fsdp=True)
    assert res.returncode == 0, res.stderr[-4000:]
    eval_main(*eval_args([*ev, "--run", "one", "--generation_batch_size", "4"]))
    r1, r2 = (json.loads((runs_dir / r / "eval/report.json").read_text()) for r in ("one", "two"))
    assert [(s["sft"], s["ppo"]) for s in r2["samples"]] == [(s["sft"], s["ppo"]) for s in r1["samples"]]
    assert len(r2["samples"]) == 6 * 4  # configs/eval.yaml's samples_per_prompt
    for key in ("reward_sft", "reward_ppo", "kl"):
        assert max(abs(a[key] - b[key]) for a, b in zip(r1["samples"], r2["samples"])) < 1e-5, key
    # The gold report under FSDP: the same curve over the kept policies and the same RM-vs-gold agreement.
    g1, g2 = r1["gold"], r2["gold"]
    assert g2 is not None and [p["update"] for p in g2["curve"]] == [p["update"] for p in g1["curve"]] == [0, 4, 8, 11]
    for a, b in zip(g1["curve"], g2["curve"]):
        assert b["gold"] == a["gold"] and b["proxy"] == pytest.approx(a["proxy"], abs=1e-5)
        assert b["kl_mean"] == pytest.approx(a["kl_mean"], abs=1e-5)
    h1, h2 = g1["rm_agreement_heldout_pairs"], g2["rm_agreement_heldout_pairs"]
    assert h2["pairs"] == h1["pairs"] == 3 and h2["agreement"] == h1["agreement"]
    assert_really_sharded(manifest(runs_dir, "two", "eval")["metrics"])


@pytest.mark.slow
def test_pairs_fsdp2_killed_keeps_its_batches_and_ends_as_an_uninterrupted_one(tiny_models, runs_dir):
    """resume == no resume on a sharded base: two FSDP2 ranks killed once each has kept 2 of its 3 batches
    (tests/killed_stage.py; 6 batches, 3 rounds), rank 1's second batch then lost (as when a rank dies first), and the
    same command again: round 0 is skipped by both ranks together, round 1 sampled by both (every forward is a
    collective: rank 0 alone skipping it would leave rank 1 waiting), and the pairs are the uninterrupted sharded
    run's, to the byte."""
    import datasets

    from tests.fake_upstream import build_upstream

    profile = str(tiny_models["llama"])
    for run in ("whole", "cut"):
        build_upstream(runs_dir, profile, run)

    def args(run):  # 6 prompts x 2 responses in batches of 2: 6 batches, each rank's b % 2
        return ["--config", "configs/pairs.yaml", "--runs_dir", str(runs_dir), "--model_config", profile, "--run", run,
                "--max_prompts", "6", "--num_responses", "2", "--max_new_tokens", "8", "--generation_batch_size", "2"]

    whole = run_module("stages.pairs", args("whole"), fsdp=True)
    assert whole.returncode == 0, whole.stderr[-4000:]
    killed = run_module("tests.killed_stage", ["stages.pairs", "batches:2", *args("cut")], fsdp=True)
    assert killed.returncode != 0 and "killed after 2 batches" in killed.stderr, killed.stderr[-4000:]
    kept_dir = runs_dir / "cut" / "pairs" / "sampled"
    assert sorted(p.name for p in kept_dir.glob("batch-*")) == [f"batch-{b:06d}.pt" for b in range(4)]
    (kept_dir / "batch-000003.pt").unlink()
    resumed = run_module("stages.pairs", args("cut"), fsdp=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert resumed.stderr.count("note: 3 batches sampled by an interrupted run of the same command are kept") == 1
    m_whole, m_cut = (manifest(runs_dir, r, "pairs")["metrics"] for r in ("whole", "cut"))
    assert_really_sharded(m_cut)
    assert m_cut["batches_kept_from_an_interrupted_run"] == 3 and m_whole["batches_kept_from_an_interrupted_run"] == 0
    one, two = (datasets.load_from_disk(str(runs_dir / r / "pairs/dataset")) for r in ("whole", "cut"))
    assert len(one) > 0 and two["pair_id"] == one["pair_id"] and two["responses"] == one["responses"]
    assert not kept_dir.exists()


def test_all_gpus_configs_start_one_process_per_gpu_of_the_machine(tmp_path, monkeypatch, capsys):
    """multi_gpu.yaml and fsdp.yaml say "all GPUs of one machine" (gpu_ids: all) but must give accelerate some
    num_processes (8): on a machine with fewer or more GPUs, pipeline.launch starts one process per GPU instead, and
    that count is part of the launch a manifest records. A config of the user's own keeps its num_processes."""
    from pipeline import launch

    for name in ("multi_gpu.yaml", "fsdp.yaml"):
        config = REPO / "configs" / "accelerate" / name
        assert launch.processes_for_all_gpus(config, lambda: 4) == ["--num_processes", "4"]
        assert launch.processes_for_all_gpus(config, lambda: 16) == ["--num_processes", "16"]
        assert launch.processes_for_all_gpus(config, lambda: 8) == []
        with pytest.raises(ConfigError, match=f"ACCELERATE_CONFIG={config} starts one process per GPU, and torch "
                                              "sees no GPU here"):  # not 8 CPU processes: 8 times the batch
            launch.processes_for_all_gpus(config, lambda: 0)
    for name in ("cpu.yaml", "cpu2.yaml", "fsdp_cpu2.yaml"):  # a fixed number of processes, GPUs or not
        assert launch.processes_for_all_gpus(REPO / "configs" / "accelerate" / name, lambda: 4) == []
    own = tmp_path / "mine.yaml"
    own.write_text((REPO / "configs/accelerate/multi_gpu.yaml").read_text().replace("num_processes: 8", "num_processes: 2"))
    assert launch.processes_for_all_gpus(own, lambda: 8) == []

    # what make runs: the stage is launched, and checked for being current, with one process per GPU
    launched, compared = [], []
    monkeypatch.setattr(launch, "gpus_here", lambda: 4)
    monkeypatch.setattr(launch.processes_for_all_gpus, "__defaults__", (launch.gpus_here,))
    monkeypatch.setattr(launch, "launch", lambda ours, module, stage_args, stage: launched.append(ours) or 0)
    monkeypatch.setattr(launch, "is_current", lambda stage, argv, ours: compared.append(ours) or (False, "test"))
    monkeypatch.chdir(REPO)
    assert launch.main(["sft", "--config_file", "configs/accelerate/multi_gpu.yaml", "-m", "tests.fake_stages.sft"]) == 0
    assert launched == compared == [["--config_file", "configs/accelerate/multi_gpu.yaml", "--num_processes", "4"]]
    # no GPU: one error line and exit 2, before the stage's folder is locked or checked
    monkeypatch.setattr(launch, "gpus_here", lambda: 0)
    monkeypatch.setattr(launch.processes_for_all_gpus, "__defaults__", (launch.gpus_here,))
    monkeypatch.setattr(launch, "hold_stage_folder", lambda folder: pytest.fail("the folder was locked"))
    assert launch.main(["sft", "--config_file", "configs/accelerate/fsdp.yaml", "-m", "tests.fake_stages.sft"]) == 2
    assert len(launched) == 1
    # one GPU under fsdp.yaml: one process, with nothing to shard over (the file says 8): refused, nothing launched
    monkeypatch.setattr(launch, "gpus_here", lambda: 1)
    monkeypatch.setattr(launch.processes_for_all_gpus, "__defaults__", (launch.gpus_here,))
    monkeypatch.setattr(launch, "hold_stage_folder", lambda folder: (object(), ""))
    capsys.readouterr()
    assert launch.main(["sft", "--config_file", "configs/accelerate/fsdp.yaml", "-m", "tests.fake_stages.sft"]) == 2
    assert len(launched) == 1 and "FSDP with all the GPUs of a machine that has one" in capsys.readouterr().err
    assert launch.main(["sft", "--config_file", "configs/accelerate/multi_gpu.yaml", "-m", "tests.fake_stages.sft"]) == 0
    assert launched[-1] == ["--config_file", "configs/accelerate/multi_gpu.yaml", "--num_processes", "1"]  # DDP: fine


def test_the_inference_and_rl_stages_collectives_wait_as_long_as_the_trainer_stages(monkeypatch):
    """process_state (pairs, PPO and its variants, eval): the process group's timeout is the Trainer's 30 minutes, not
    NCCL's default 10 (eval's other ranks wait at a barrier while the main process runs the gold judge); CPU ranks
    (ACCELERATE_USE_CPU) are counted as CPU ranks."""
    from datetime import timedelta

    import accelerate

    from pipeline import sharding

    made = []
    monkeypatch.setattr(accelerate, "PartialState", lambda **kwargs: made.append(kwargs) or kwargs)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    assert sharding.process_state() == {"cpu": True, "timeout": timedelta(seconds=1800)}
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert sharding.process_state() == {"cpu": False, "timeout": timedelta(seconds=1800)}


def _shared_check_rank(rank: int, init_file: str, dirs: list[str], results: str) -> None:
    """One "node" of two (one process each) on this machine: its RUNS_DIR is dirs[rank]."""
    import json
    import os

    import torch.distributed as dist

    from pipeline.sharding import require_shared_runs_dir

    os.environ.update(WORLD_SIZE="2", LOCAL_WORLD_SIZE="1", GROUP_RANK=str(rank), RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        require_shared_runs_dir(dirs[rank], "sft")
        outcome = "ok"
    except ConfigError as err:
        outcome = str(err)
    finally:
        dist.destroy_process_group()
    with open(f"{results}.{rank}", "w") as f:
        json.dump(outcome, f)


@pytest.mark.slow  # two processes
@pytest.mark.parametrize("shared", [True, False])
def test_several_machines_need_one_runs_dir_and_are_told_so_in_one_line(shared, tmp_path):
    """Every stage but PPO writes from the main process alone and resumes from each rank's own disk: on machines with
    their own copies of RUNS_DIR pairs and eval crashed, the reward model's ranks scored two models, a resumed SFT hung.
    Two "nodes" (LOCAL_WORLD_SIZE 1 of WORLD_SIZE 2) seeing one folder pass, and leave nothing in it; seeing two, every
    rank stops with the one line naming the node that cannot see node 0's writes."""
    import json

    import torch.multiprocessing as mp

    dirs = [str(tmp_path / "runs")] * 2 if shared else [str(tmp_path / "node0" / "runs"), str(tmp_path / "node1" / "runs")]
    results = str(tmp_path / "result")
    mp.spawn(_shared_check_rank, args=(str(tmp_path / "init"), dirs, results), nprocs=2, join=True)
    outcomes = [json.loads(open(f"{results}.{rank}").read()) for rank in (0, 1)]
    if shared:
        assert outcomes == ["ok", "ok"] and list(Path(dirs[0]).iterdir()) == []
    else:
        assert outcomes == [f"RUNS_DIR {dirs[rank]} is not one folder for every machine: what node 0 writes there, "
                            f"node(s) 1 do not see. `sft` on several machines needs it on a filesystem they share (NFS "
                            f"or the like; --runs_dir); only PPO runs without one" for rank in (0, 1)]
        assert list(Path(dirs[0]).iterdir()) == []


def test_one_machine_checks_no_shared_runs_dir(monkeypatch, tmp_path):
    """On one machine (WORLD_SIZE == LOCAL_WORLD_SIZE, or no launch at all) there is nothing to check: no collective
    runs (a single process has no process group) and nothing is written."""
    from pipeline.sharding import require_shared_runs_dir

    for env in ({}, {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}):
        for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        require_shared_runs_dir(str(tmp_path / "runs"), "sft")
        assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("cpu_ranks", [True, False])
def test_a_launch_of_cpu_ranks_hides_the_gpus_from_them(cpu_ranks, monkeypatch):
    """cpu2.yaml and fsdp_cpu2.yaml run their ranks on the CPU (ACCELERATE_USE_CPU=1), but on a machine with a GPU
    transformers' sharded load bound each rank's shard to cuda:RANK (a 1-GPU machine: rank 1 asked for cuda:1): their
    launch sees no GPU. Any other launch keeps the GPUs it has."""
    import accelerate.commands.launch as accelerate_launch

    from pipeline import launch

    seen = {}
    monkeypatch.setattr(accelerate_launch, "launch_command", lambda args: seen.update(
        visible=os.environ.get("CUDA_VISIBLE_DEVICES")))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    if cpu_ranks:
        monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    else:
        monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    for key in (launch.LAUNCH_ENV, launch.STAGE_ENV, launch.LAUNCHER_PID_ENV):  # launch() sets them: set here first,
        monkeypatch.setenv(key, "")  # so that they go again after the test (PIPELINE_STAGE=sft refused later ppo parses)
    launch.launch(["--config_file", "configs/accelerate/cpu2.yaml"], "tests.fake_stages.sft", [], "sft")
    assert seen == {"visible": "" if cpu_ranks else "0,1"}


@pytest.mark.parametrize("name", ["sft", "rm", "dpo", "pairs", "eval"])
def test_every_stage_but_ppo_checks_for_one_runs_dir_before_it_writes(name, monkeypatch, tmp_path):
    """require_shared_runs_dir guards a stage only if the stage calls it, and before its run folder is touched: each of
    the five stops at it (here made to refuse) with RUNS_DIR still absent."""
    import importlib

    from pipeline.config import parse

    module = importlib.import_module(f"stages.{name}")
    checked = []

    def refuse(runs_dir, stage):
        checked.append((runs_dir, stage))
        raise ConfigError("not one folder")

    monkeypatch.setattr(module, "require_shared_runs_dir", refuse)
    monkeypatch.chdir(REPO)
    runs = tmp_path / "runs"
    parsed = parse(module.CONFIG_CLASSES(), ["--config", f"configs/{name}.yaml", "--run", "t", "--runs_dir", str(runs)])
    with pytest.raises(ConfigError, match="not one folder"):
        module.main(*parsed)
    assert checked == [(str(runs), name)] and not runs.exists()
