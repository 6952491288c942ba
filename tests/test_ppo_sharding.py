"""PPO with its frozen base loaded sharded across ranks (torch FSDP2, pipeline/sharding.py; stages/ppo/sharding.py decides).

The slow test launches the stage as a user would, `accelerate launch --config_file configs/accelerate/fsdp.yaml`
with two real CPU processes, and compares it with the same run as plain data parallel (configs/accelerate/cpu2.yaml).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, ModelProfile
from stages.ppo import parse_args
from stages.ppo.trainer import TIMING_KEYS
from pipeline.launch import ACCELERATE_LAUNCH, free_port
from tests.conftest import REPO, run_as_group, run_module
from tests.fake_upstream import _lora_adapter
from tests.test_ppo import (_upstream_manifests, adapters, load_with_stock_peft, no_grad, ppo_args, prompts_file,  # noqa: F401
                             read_metrics, read_metrics_of, yaml_model_dir)


def ppo_cfg(*extra):
    return parse_args(["--config", "configs/ppo.yaml", *extra])[0]


# ------------------------------------------------------------------------------------------------ when to shard

@pytest.mark.parametrize("shard_base, fsdp_env, world, expected", [
    ("auto", "true", 2, True),     # accelerate launch --config_file configs/accelerate/fsdp.yaml
    ("auto", None, 2, False),      # a DDP config
    ("false", "true", 2, False),   # an FSDP launch told not to shard
    ("true", None, 2, True),       # any launch, told to shard
    ("auto", "True", 2, True),     # the variable set by hand, in any case
    ("true", "true", 1, False),    # one process: nothing to shard across
])
def test_sharding_follows_shard_base_and_the_launch(shard_base, fsdp_env, world, expected, monkeypatch):
    from stages.ppo.sharding import sharding_wanted

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("PIPELINE_FSDP", raising=False)
    if fsdp_env:
        monkeypatch.setenv("ACCELERATE_USE_FSDP", fsdp_env)
    profile = ModelProfile(name_or_path="models/tiny")
    assert sharding_wanted(ppo_cfg("--shard_base", shard_base), world, profile) is expected


def test_shard_base_reads_yaml_booleans_and_refuses_other_values(tmp_path):
    cfg_file = tmp_path / "ppo.yaml"
    cfg_file.write_text((REPO / "configs/ppo.yaml").read_text().replace("shard_base: auto", "shard_base: false"))
    assert parse_args(["--config", str(cfg_file)])[0].shard_base == "false"
    with pytest.raises(ConfigError, match="shard_base must be one of"):
        ppo_cfg("--shard_base", "yes")


def test_a_4bit_base_is_refused_for_sharding(monkeypatch):
    from stages.ppo.sharding import sharding_wanted

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="load_in_4bit"):
        sharding_wanted(ppo_cfg(), 2, ModelProfile(name_or_path="models/tiny", load_in_4bit=True))


# ------------------------------------------------------------------------------------------------ what a rank holds

def test_base_numel_is_the_frozen_base_alone(tiny_models, adapters):
    """base_numel, what the manifest reports as the base each rank holds: the checkpoint's weights plus the frozen
    original of the score head (1 x hidden), and none of the adapters' tensors (LoRA, the heads' trained copies).
    Unsharded, this rank holds all of it."""
    from transformers import AutoModelForCausalLM

    from pipeline.models import load_tokenizer, profile_from
    from stages.ppo import build_stack
    from stages.ppo.sharding import base_numel

    profile = profile_from(str(tiny_models["llama"]))
    stack = build_stack(profile, load_tokenizer(profile), *adapters("llama"), torch.device("cpu"), False)
    checkpoint = AutoModelForCausalLM.from_pretrained(profile.name_or_path).num_parameters()
    expected = checkpoint + 32  # hidden_size 32
    full, mine, stored = base_numel(stack)
    assert (full, mine) == (expected, expected)
    assert stored == mine  # each weight in storage of its own size
    # A weight that is a view of a larger storage (a shard sliced from a whole weight as read) holds all of it.
    norm = stack.causal_lm.model.norm.weight
    norm.data = torch.ones(3 * norm.numel())[: norm.numel()]
    assert base_numel(stack) == (expected, expected, expected + 2 * norm.numel())
    assert sum(p.numel() for p in stack.model.parameters()) > expected  # the adapters exist, and are not counted
    # A sharded weight (a DTensor: to_local() is this rank's shard) counts whole in the base, as its shard on this rank.
    norm.to_local = lambda: torch.ones(norm.numel() // 2)
    assert base_numel(stack) == (expected, expected - norm.numel() // 2, expected - norm.numel() // 2)


# ------------------------------------------------------------------------------------------------ lockstep sampling

def test_a_rank_done_first_keeps_stepping_but_samples_nothing_more(tiny_models, adapters, prompts_file, no_grad):
    """Under sharding the sampling loop ends when every rank is done. A rank whose rows all ended keeps running
    forwards for the others, yet returns exactly what it returns alone and draws nothing more from its generator."""
    from pipeline.generation import left_pad
    from pipeline.models import load_tokenizer, profile_from
    from stages.ppo import build_stack, load_prompts
    from stages.ppo.rollout import sample

    profile = profile_from(str(tiny_models["llama"]))
    tok = load_tokenizer(profile)
    stack = build_stack(profile, tok, *adapters("llama"), torch.device("cpu"), False)
    cfg = ppo_cfg("--model_config", str(tiny_models["llama"]), "--dataset_name", str(prompts_file), "--max_prompt_length", "48")
    _, ids, _, _ = load_prompts(cfg, tok)
    q_ids, q_mask = left_pad(ids[:4], tok.pad_token_id)
    lm = stack.causal_lm
    stack.use("policy")
    # Every token but one ends a response: the rows end after one token, long before response_length.
    stops = [i for i in range(len(tok)) if i != 5]
    calls = []
    counting = lm.register_forward_hook(lambda *a: calls.append(1))
    alone_gen, lock_gen = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    alone = sample(lm, q_ids, q_mask, 12, 0.7, stops, tok.pad_token_id, alone_gen)
    n_alone = len(calls)
    votes = []
    lock = sample(lm, q_ids, q_mask, 12, 0.7, stops, tok.pad_token_id, lock_gen,
                  all_ranks_done=lambda done: votes.append(done) or len(votes) == 12)  # another rank runs to the end
    counting.remove()
    assert alone.response_ids.shape[1] < 12 and bool(alone.ended.all())
    assert n_alone == alone.response_ids.shape[1]
    assert len(calls) - n_alone == 12, "the lockstep rank runs the prompt forward and 11 decoding steps"
    n = alone.response_ids.shape[1]
    assert votes == [False] * (n - 1) + [True] * (13 - n), "each step asks once whether every rank is done"
    for field in ("response_ids", "response_mask", "logprobs", "entropy", "ended"):
        assert torch.equal(getattr(lock, field), getattr(alone, field)), field
    assert torch.equal(lock_gen.get_state(), alone_gen.get_state()), "a finished rank drew more random numbers"


def _vote(rank: int, port: int, votes: list[bool], out: str) -> None:
    import torch.distributed as dist

    from pipeline.sharding import on_every_rank

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results = [on_every_rank(v, torch.device("cpu")) for v in votes[rank::2]]
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.mark.slow
def test_every_rank_is_true_only_when_all_ranks_say_so(tmp_path):
    """The sampling loop's global exit: one rank done and the other not is 'not done' on both."""
    import torch.multiprocessing as mp

    port = free_port()
    votes = [True, True, True, False, False, True, False, False]  # (rank 0, rank 1) pairs
    mp.spawn(_vote, args=(port, votes, str(tmp_path)), nprocs=2)
    expected = [True, False, False, False]
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [expected, expected]


# ------------------------------------------------------------------------------------------------ two processes

# A launch here takes 30-40 s on 2 cores; a rank stuck in a collective (peft gathering a sharded base on the main
# process alone) hangs until this, and a mutant that does so is then killed, with its ranks (tools/mutants.py).
FSDP_LAUNCH_TIMEOUT_S = 300


def launch_fsdp(module: str, args: list[str], timeout: int = FSDP_LAUNCH_TIMEOUT_S):
    """`accelerate launch --config_file configs/accelerate/fsdp.yaml` with two CPU processes: the config's FSDP
    environment (ACCELERATE_USE_FSDP=true) reaches the stage; on CPU accelerate itself runs it as plain DDP. Without
    the config's bf16 autocast, which PPO follows (tests/test_ppo.py, mixed_precision): these tests compare sharding
    with DDP's fp32 numbers. Through run_as_group: on a timeout the ranks, in sessions of their own, die too."""
    port = free_port()
    cmd = [*ACCELERATE_LAUNCH, "--config_file", "configs/accelerate/fsdp.yaml", "--num_processes", "2",
           "--mixed_precision", "no", "--main_process_port", str(port), "-m", module, *args]
    return run_as_group(cmd, timeout, {**os.environ, "ACCELERATE_USE_CPU": "1"})


def test_an_fsdp_launch_is_bounded_and_kills_its_ranks_on_a_timeout(monkeypatch):
    """launch_fsdp goes through run_as_group (which kills the ranks too: tests/test_resume.py) with a bound of 300 s:
    through subprocess.run, a launch hung in a collective left both ranks running, orphaned, after its 900 s."""
    import tests.test_ppo_sharding as here

    calls = []
    monkeypatch.setattr(here, "run_as_group", lambda cmd, timeout, env: calls.append((cmd[-3:], timeout, env)))
    launch_fsdp("stages.ppo", ["--run", "x"])
    ((tail, timeout, env),) = calls
    assert (tail, timeout, env["ACCELERATE_USE_CPU"]) == (["stages.ppo", "--run", "x"], 300, "1")


def strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


@pytest.mark.slow
def test_sharded_base_trains_like_ddp_and_resumes_exactly(tiny_models, adapters, prompts_file, runs_dir, tmp_path):
    """Two ranks with the base sharded (FSDP config) against two data-parallel ranks, same seeds: each rank holds
    half of the base, every metric matches, the adapters load in stock PEFT; the sharded run is stopped after one
    update and resumed, and still matches the straight DDP run."""
    from safetensors.torch import load_file

    sft, rm = adapters("llama")
    for run in ("ddp", "fsdp"):
        _upstream_manifests(runs_dir, run, sft, rm)
    ddp = run_module("stages.ppo", ppo_args(tiny_models["llama"], runs_dir, "ddp", prompts_file), processes=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    stopped = launch_fsdp("stages.ppo", ppo_args(tiny_models["llama"], runs_dir, "fsdp", prompts_file, None, None,
                                                 "--stop_after", "1"))
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert not (Path(runs_dir) / "fsdp/ppo/manifest.json").exists()
    resumed = launch_fsdp("stages.ppo", ppo_args(tiny_models["llama"], runs_dir, "fsdp", prompts_file))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr

    m_ddp = json.loads((Path(runs_dir) / "ddp/ppo/manifest.json").read_text())["metrics"]
    m_fsdp = json.loads((Path(runs_dir) / "fsdp/ppo/manifest.json").read_text())["metrics"]
    assert m_fsdp["world_size"] == m_ddp["world_size"] == 2
    assert m_fsdp["base_sharded"] is True and m_ddp["base_sharded"] is False
    full = m_ddp["base_numel"]
    assert m_fsdp["base_numel"] == full and m_ddp["base_numel_per_rank"] == [full, full]
    # Each rank holds half of every checkpoint weight (the base is loaded sharded) and the whole frozen score slot
    # (1 x hidden, put on after the load: tiny next to the base).
    hidden = 32
    assert m_fsdp["base_numel_per_rank"] == [(full - hidden) // 2 + hidden] * 2, (m_fsdp["base_numel_per_rank"], full)
    # ... and no more memory than that: no shard is a view of a whole weight as read (pipeline.sharding.own_shards).
    assert m_fsdp["base_stored_numel_per_rank"] == m_fsdp["base_numel_per_rank"]
    assert [len(m["peak_memory_mb_per_rank"]) for m in (m_ddp, m_fsdp)] == [2, 2]  # every rank's, not the first's
    assert m_fsdp["ranks_in_sync"], m_fsdp["rank_param_digests"]

    # Same episodes, same updates: the metrics agree (stated tolerance: rel 1e-5; in practice they are equal).
    a, b = strip(read_metrics(runs_dir, "ddp")), strip(read_metrics(runs_dir, "fsdp"))
    assert [r["update"] for r in b] == [1, 2, 3]
    assert a[0].keys() == b[0].keys()
    for ra, rb in zip(a, b):
        for key, va in ra.items():
            if isinstance(va, float):
                assert rb[key] == pytest.approx(va, rel=1e-5, abs=1e-7), (ra["update"], key)
            else:
                assert rb[key] == va, (ra["update"], key)
    for name in ("adapter", "value_adapter"):
        wa = load_file(str(Path(runs_dir) / "ddp/ppo" / name / "adapter_model.safetensors"))
        wb = load_file(str(Path(runs_dir) / "fsdp/ppo" / name / "adapter_model.safetensors"))
        assert wa.keys() == wb.keys() and len(wa) > 10
        for k in wa:
            assert torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7), (name, k)

    # The sharded run's outputs are complete PEFT folders: stock PEFT loads them from any working directory.
    manifest = json.loads((Path(runs_dir) / "fsdp/ppo/manifest.json").read_text())
    policy, value = load_with_stock_peft(manifest, tmp_path)
    saved = load_file(str(Path(manifest["outputs"]["adapter"]) / "adapter_model.safetensors"))
    loaded = dict(policy.named_parameters())
    for k, v in saved.items():
        name = k[: -len(".weight")] + ".default.weight"
        assert torch.equal(loaded[name].detach(), v), k
    assert value.active_adapter == "default"


@pytest.mark.slow
def test_sharded_grpo_runs_each_prompt_once_like_ddp(tiny_models, adapters, prompts_file, runs_dir):
    """GRPO on a sharded base: the scoring and update forwards run each group's prompt once and continue its answers
    on the KV cache (two forwards of the sharded modules per pass). Two FSDP ranks match two DDP ranks. The reward
    is an ensemble of two reward models: each member's forward runs on every rank in lockstep."""
    sft, rm = adapters("llama")
    other = _lora_adapter(yaml_model_dir(tiny_models["llama"]), ["q_proj", "v_proj"], Path(runs_dir) / "rm-b-adapter",
                          seed=5, task_type="SEQ_CLS")
    grpo = ["--advantage_estimator", "grpo", "--num_samples_per_prompt", "4", "--use_kl_loss", "true",
            "--total_updates", "2"]
    for run in ("ddp", "fsdp"):
        _upstream_manifests(runs_dir, run, sft, rm, (other,))
    ddp = run_module("stages.ppo", ppo_args(tiny_models["llama"], runs_dir, "ddp", prompts_file, None, None, *grpo),
                     processes=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    fsdp = launch_fsdp("stages.ppo", ppo_args(tiny_models["llama"], runs_dir, "fsdp", prompts_file, None, None, *grpo))
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    assert "mean of an ensemble of 2" in ddp.stdout + ddp.stderr and "mean of an ensemble of 2" in fsdp.stdout + fsdp.stderr
    m_ddp = json.loads((Path(runs_dir) / "ddp/grpo/manifest.json").read_text())["metrics"]
    m_fsdp = json.loads((Path(runs_dir) / "fsdp/grpo/manifest.json").read_text())["metrics"]
    assert m_fsdp["world_size"] == m_ddp["world_size"] == 2 and m_fsdp["base_sharded"] is True
    a, b = (strip(read_metrics_of(Path(runs_dir) / run / "grpo")) for run in ("ddp", "fsdp"))
    assert [r["update"] for r in b] == [1, 2] and a[0]["reward_std"] > 0
    for ra, rb in zip(a, b):
        for key, va in ra.items():
            assert rb[key] == (pytest.approx(va, rel=1e-5, abs=1e-6) if isinstance(va, float) else va), (ra["update"], key)


def test_saving_an_adapter_runs_no_state_dict_hook(tiny_models, adapters, tmp_path):
    """AdapterStack.save reads the adapter from the model's parameters, never through `state_dict()`: on a sharded base
    FSDP's state-dict hook reshards the unit kept gathered (the LM head) on the main process only, which saves alone,
    and the ranks' next forwards would gather different units. The saved tensors are the policy adapter's own."""
    from safetensors.torch import load_file

    from pipeline.adapters import adapter_of
    from pipeline.models import load_tokenizer, profile_from
    from stages.ppo import build_stack

    profile = profile_from(str(tiny_models["llama"]))
    stack = build_stack(profile, load_tokenizer(profile), *adapters("llama"), torch.device("cpu"), False)

    def no_hooks(*a, **kw):
        raise AssertionError("state_dict() called: FSDP's hooks would run on the main process alone")

    stack.model.state_dict = no_hooks
    stack.save("policy", tmp_path / "policy")
    saved = load_file(str(tmp_path / "policy" / "adapter_model.safetensors"))
    own = {n.replace(".policy.", "."): p for n, p in stack.model.named_parameters() if adapter_of(n) == "policy"}
    assert len(saved) == len(own) > 0
    for name, tensor in saved.items():
        assert torch.equal(tensor, own[name].detach()), name


def test_a_saved_adapter_is_on_disk_before_the_rename_that_makes_it_the_adapter(tiny_models, adapters, tmp_path,
                                                                               monkeypatch):
    """AdapterStack.save writes into .NAME.saving/ and renames the adapter's folder over the old one: every file is fsynced under the
    temporary name first, and the parent folder after the rename."""
    from pipeline.models import load_tokenizer, profile_from
    from stages.ppo import build_stack
    from tests.conftest import recorded_fsyncs

    profile = profile_from(str(tiny_models["llama"]))
    stack = build_stack(profile, load_tokenizer(profile), *adapters("llama"), torch.device("cpu"), False)
    calls = recorded_fsyncs(monkeypatch)
    stack.save("policy", tmp_path / "policy")
    saving = tmp_path / ".policy.saving" / "policy"  # PEFT saves a named adapter in a folder of its name
    saved = {str(saving / p.name) for p in (tmp_path / "policy").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "policy").iterdir()}
    assert saved <= set(calls[:-1]) and str(saving) in calls[:-1], calls
    assert calls[-1] == str(tmp_path), calls
