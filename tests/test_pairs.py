"""`make pairs` on a tiny fixture model: the real stage under accelerate launch, then reruns in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO, on_device, run_module

# --max_prompt_tokens: the test tokenizer (512 tokens) splits words finer than the base's, so story prompts run longer
TINY = ["--max_prompts", "6", "--max_new_tokens", "8", "--generation_batch_size", "8", "--num_responses", "2",
        "--max_prompt_tokens", "256"]


def make_sft_run(runs_dir, run: str, profile_yaml) -> str:
    """What stages.sft leaves behind (adapter + tokenizer + fingerprint + manifest), without training for a minute."""
    import torch
    from peft import get_peft_model

    from pipeline.config import load_model_profile
    from pipeline.models import load_base, load_tokenizer, lora_config, resolve_base, save_fingerprint
    from pipeline.run import StageRun

    profile = load_model_profile(profile_yaml)
    tok = load_tokenizer(profile)
    base = load_base(profile, tok)
    torch.manual_seed(0)
    model = get_peft_model(base, lora_config(profile, 4, 8, 0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a fresh LoRA is a no-op (B = 0); make it change the policy
            torch.nn.init.normal_(p, std=0.02)
    stage = StageRun("sft", run, str(runs_dir))
    stage.prepare({})
    adapter = stage.dir / "adapter"
    model.save_pretrained(adapter)
    tok.save_pretrained(adapter)
    save_fingerprint(adapter, base.config, resolve_base(profile.name_or_path))
    stage.finish({"adapter": adapter, "base_model": resolve_base(profile.name_or_path)}, {}, {})
    return str(adapter)


@pytest.mark.slow
def test_make_pairs_on_tiny_model(tiny_models, runs_dir):
    import datasets

    from pipeline.config import parse, RunArgs
    from pipeline.generation import SamplingConfig
    from stages.pairs import PairsArgs, main

    profile = str(tiny_models["llama"])
    adapter = make_sft_run(runs_dir, "r", profile)
    base_args = ["--config", "configs/pairs.yaml", "--runs_dir", str(runs_dir), "--model_config", profile, *TINY]

    # The Makefile's way on a CPU of two cores or more: accelerate launch -m stages.pairs, two processes
    proc = run_module("stages.pairs", [*base_args, "--run", "r"], processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((runs_dir / "r/pairs/manifest.json").read_text())
    assert manifest["metrics"]["pairs"] == 6 and manifest["upstream"]["sft"]["outputs"]["adapter"] == adapter
    assert manifest["metrics"]["world_size"] == 2
    ds = datasets.load_from_disk(manifest["outputs"]["dataset"])
    assert {"pair_id", "prompt_id", "prompt", "responses", "generation", "policy", "ended"} <= set(ds.column_names)
    row = ds[0]
    assert row["prompt"][0]["role"] == "user" and len(row["responses"]) == 2
    assert row["generation"]["seed"] == 42 and row["generation"]["temperature"] == 0.7
    assert row["policy"]["adapter"] == adapter
    assert len(set(ds["pair_id"])) == len(ds) and all(len(p) == 16 for p in ds["pair_id"])
    prompts_file = parse((PairsArgs, SamplingConfig, RunArgs), base_args)[0].prompts_file  # the YAML's bundled prompts
    bundled = {json.loads(line)["prompt"][0]["content"] for line in open(REPO / prompts_file)}
    assert all(r["prompt"][0]["content"] in bundled for r in ds)

    # Same config and seed in one process: the same pairs, so the ids (hash of prompt + responses) match.
    make_sft_run(runs_dir, "again", profile)
    main(*parse((PairsArgs, SamplingConfig, RunArgs), [*base_args, "--run", "again"]))
    again = datasets.load_from_disk(str(runs_dir / "again/pairs/dataset"))
    assert again["pair_id"] == ds["pair_id"]

    # K = 3: every pair of the three responses of a prompt.
    main(*parse((PairsArgs, SamplingConfig, RunArgs), [*base_args, "--run", "again", "--num_responses", "3",
                                                        "--max_prompts", "2"]))
    three = datasets.load_from_disk(str(runs_dir / "again/pairs/dataset"))
    assert len(three) == 6 and sorted(map(tuple, three["response_indices"]))[:3] == [(0, 1), (0, 1), (0, 2)]


def test_pairs_refuses_greedy_and_missing_sft(tiny_models, runs_dir):
    from pipeline.config import ConfigError, RunArgs, parse
    from pipeline.generation import SamplingConfig
    from stages.pairs import PairsArgs, main

    args = ["--config", "configs/pairs.yaml", "--runs_dir", str(runs_dir), "--run", "none"]
    with pytest.raises(ConfigError, match="make sft"):
        main(*parse((PairsArgs, SamplingConfig, RunArgs), args))
    with pytest.raises(ConfigError, match="temperature 0"):
        main(*parse((PairsArgs, SamplingConfig, RunArgs), [*args, "--temperature", "0"]))
    with pytest.raises(ConfigError, match="top_k 1 is greedy decoding"):  # the pairs were sampled, then refused
        main(*parse((PairsArgs, SamplingConfig, RunArgs), [*args, "--top_k", "1"]))
    with pytest.raises(ConfigError, match="num_responses must be at least 2 to make pairs, got 1"):  # one makes no pair
        main(*parse((PairsArgs, SamplingConfig, RunArgs), [*args, "--num_responses", "1"]))
    from stages.pairs import load_prompts

    with pytest.raises(ConfigError, match=r"nope\.jsonl does not exist: check the path given to --prompts_file$"):
        load_prompts(PairsArgs(prompts_file="nope.jsonl"))
    with pytest.raises(ConfigError, match=r"nope\.jsonl does not exist: check the path given to --dataset_name$"):
        load_prompts(PairsArgs(dataset_name="nope.jsonl"))


def test_pairs_on_a_bf16_base_on_the_accelerator(tiny_models_bf16, runs_dir, monkeypatch):
    """A bf16 profile: the base is bf16, the SFT adapter's LoRA weights stay float32, generation works; the policy is
    moved to this process's accelerator (PartialState().device) before it samples."""
    import datasets
    from accelerate import PartialState

    import stages.pairs as pairs
    from pipeline.config import RunArgs, parse
    from pipeline.generation import SamplingConfig

    profile = str(tiny_models_bf16["llama"])
    make_sft_run(runs_dir, "bf", profile)
    moved, seen = [], []
    real_to_device, real_generate = pairs.to_device, pairs.generate
    monkeypatch.setattr(pairs, "to_device", lambda model, device=None: moved.append(model) or real_to_device(model, device))

    def spy(model, *a, **k):
        seen.append((model, {str(p.dtype) for n, p in model.named_parameters() if "lora_" in n},
                     {str(p.dtype) for n, p in model.named_parameters() if "lora_" not in n and ".score." not in n},
                     next(model.parameters()).device))  # the stack's score slot is float32 (pipeline.adapters)
        return real_generate(model, *a, **k)

    monkeypatch.setattr(pairs, "generate", spy)
    metrics = pairs.main(*parse((pairs.PairsArgs, SamplingConfig, RunArgs), [
        "--config", "configs/pairs.yaml", "--runs_dir", str(runs_dir), "--run", "bf", "--model_config", profile, *TINY]))
    model, lora, base, device = seen[0]
    assert model is moved[0] and on_device([device], PartialState().device)
    assert lora == {"torch.float32"} and base == {"torch.bfloat16"}
    ds = datasets.load_from_disk(str(runs_dir / "bf/pairs/dataset"))
    assert metrics["pairs"] == len(ds) > 0 and all(isinstance(t, str) for r in ds["responses"] for t in r)


@pytest.mark.parametrize("mixed, autocast", [("no", None), ("bf16", "torch.bfloat16")])
def test_pairs_samples_under_the_launch_mixed_precision(mixed, autocast, tiny_models, runs_dir, monkeypatch):
    """The accelerate config's `mixed_precision` (bf16 in configs/accelerate/multi_gpu.yaml), which the Trainer
    stages get from accelerate: pairs samples under that autocast, and without one under "no"."""
    import torch

    import stages.pairs as pairs
    from pipeline.config import RunArgs, parse
    from pipeline.generation import SamplingConfig

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", mixed)
    profile = str(tiny_models["llama"])
    make_sft_run(runs_dir, "mp", profile)
    seen, real_generate = [], pairs.generate

    def spy(model, *a, **k):
        device = next(model.parameters()).device.type  # the accelerator's, on a GPU machine
        seen.append(str(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None)
        return real_generate(model, *a, **k)

    monkeypatch.setattr(pairs, "generate", spy)
    metrics = pairs.main(*parse((pairs.PairsArgs, SamplingConfig, RunArgs), [
        "--config", "configs/pairs.yaml", "--runs_dir", str(runs_dir), "--run", "mp", "--model_config", profile, *TINY]))
    assert seen == [autocast] and metrics["pairs"] > 0


def test_a_mixed_precision_it_cannot_run_is_one_error_before_the_run_folder(tiny_models, runs_dir, monkeypatch):
    import stages.pairs as pairs
    from pipeline.config import ConfigError, RunArgs, parse
    from pipeline.generation import SamplingConfig

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    profile = str(tiny_models["llama"])
    make_sft_run(runs_dir, "mp", profile)
    with pytest.raises(ConfigError, match=r"^mixed_precision 'fp8' in the accelerate config: pairs runs 'bf16', 'fp16' "
                                          r"or 'no'$"):
        pairs.main(*parse((pairs.PairsArgs, SamplingConfig, RunArgs), [
            "--config", "configs/pairs.yaml", "--runs_dir", str(runs_dir), "--run", "mp", "--model_config", profile,
            *TINY]))
    assert not (runs_dir / "mp" / "pairs").exists()


def test_a_broken_sft_adapter_is_one_error_and_the_finished_pairs_stay(tiny_models, runs_dir):
    """The SFT adapter was checked after the run folder was prepared: the finished pairs' manifest was gone (and make
    label, simulate and label-export refused the run) before the error. Now nothing under pairs/ changes."""
    import stages.pairs as pairs
    from pipeline.config import ConfigError, RunArgs, parse
    from pipeline.generation import SamplingConfig
    from tests.test_label_guards import snapshot

    profile = str(tiny_models["llama"])
    adapter = Path(make_sft_run(runs_dir, "broken", profile))
    args = ["--config", "configs/pairs.yaml", "--runs_dir", str(runs_dir), "--run", "broken", "--model_config", profile,
            *TINY, "--max_prompts", "2"]
    pairs.main(*parse((pairs.PairsArgs, SamplingConfig, RunArgs), args))
    before = snapshot(runs_dir / "broken" / "pairs")
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(ConfigError, match="SFT adapter"):
        pairs.main(*parse((pairs.PairsArgs, SamplingConfig, RunArgs), [*args, "--seed", "7"]))
    assert snapshot(runs_dir / "broken" / "pairs") == before and (runs_dir / "broken/pairs/manifest.json").is_file()


def test_pairs_on_a_base_with_its_own_code(custom_code_model, runs_dir):
    """The profile's trust_remote_code reaches the SFT adapter's check against the base's config (it raised "contains
    custom code" without it)."""
    import stages.pairs as pairs
    from pipeline.config import RunArgs, parse
    from pipeline.generation import SamplingConfig

    profile = str(custom_code_model)
    make_sft_run(runs_dir, "r", profile)
    args = ["--config", "configs/pairs.yaml", "--runs_dir", str(runs_dir), "--run", "r", "--model_config", profile,
            *TINY, "--max_prompts", "2"]
    assert pairs.main(*parse((pairs.PairsArgs, SamplingConfig, RunArgs), args))["pairs"] == 2


def test_pair_rows_drop_identical_and_repeated_pairs_so_every_pair_id_is_unique():
    from stages.pairs import pair_rows

    prompts = [[{"role": "user", "content": "once"}], [{"role": "user", "content": "twice"}]]
    # prompt 0: x y x z -> (x,y) (x,x)=identical (x,z) (y,x)=repeat of (x,y) (y,z) (x,z)=repeat; prompt 1: all distinct
    texts = ["x", "y", "x", "z", "a", "b", "c", "d"]
    rows, dropped = pair_rows(prompts, texts, [True] * 8, 4, True, {"tag": 1})
    assert dropped == {"identical": 1, "repeated": 2}
    assert [r["responses"] for r in rows[:3]] == [["x", "y"], ["x", "z"], ["y", "z"]] and len(rows) == 3 + 6
    assert len({r["pair_id"] for r in rows}) == len(rows) and all(r["tag"] == 1 for r in rows)
    assert rows[3]["response_indices"] == [0, 1] and rows[3]["prompt"] == prompts[1]
    # without drop_identical an equal pair is kept once; its repeat is still dropped
    rows, dropped = pair_rows(prompts[:1], ["x", "x", "x", "y"], [True] * 4, 4, False, {})
    assert dropped == {"identical": 0, "repeated": 4} and [r["responses"] for r in rows] == [["x", "x"], ["x", "y"]]


def test_pair_rows_key_repeats_by_prompt_and_carry_each_responses_own_end():
    """The same two texts under two prompts are two pairs with two ids (the id hashes the prompt too); each response
    keeps its own `ended`."""
    from stages.pairs import pair_rows

    prompts = [[{"role": "user", "content": "once"}], [{"role": "user", "content": "twice"}]]
    rows, dropped = pair_rows(prompts, ["x", "y", "x", "y"], [True, False, False, True], 2, True, {})
    assert dropped == {"identical": 0, "repeated": 0} and [r["responses"] for r in rows] == [["x", "y"], ["x", "y"]]
    assert rows[0]["pair_id"] != rows[1]["pair_id"] and [r["prompt"] for r in rows] == prompts
    assert [r["ended"] for r in rows] == [[True, False], [False, True]]


def test_each_pair_holds_two_responses_to_its_own_prompt(tiny_models, runs_dir, tmp_path, monkeypatch):
    """The stage asks for each prompt K times in a row and cuts the responses back into the prompt's K: with a
    generate() that answers each prompt with its own index, every pair's two responses name the pair's prompt. A
    repeated prompt is sampled once; no_eos_fraction is the share of responses without a stop token."""
    import datasets
    import torch

    import stages.pairs as pairs
    from pipeline.config import RunArgs, parse
    from pipeline.generation import Generations, SamplingConfig

    profile = str(tiny_models["llama"])
    make_sft_run(runs_dir, "order", profile)
    texts = ["a fox", "a hen", "a fox", "a dog", "an owl"]  # "a fox" twice: one prompt
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    asked = []

    def by_prompt(model, tokenizer, prompt_ids, sampling, generator_seed=None, progress=False, batches_store=None):
        asked.extend(prompt_ids)
        n, content = len(prompt_ids), [tokenizer.decode(ids) for ids in prompt_ids]
        names = [next(t for t in texts if t in c) for c in content]
        ended = torch.tensor([i % 4 != 0 for i in range(n)])  # 1 in 4 without a stop token
        return Generations(torch.zeros(n, 1, dtype=torch.long), torch.ones(n, 1, dtype=torch.long),
                           torch.ones(n, 2, dtype=torch.long), torch.ones(n, 2, dtype=torch.long),
                           [f"{name} #{i}" for i, name in enumerate(names)], ended)

    monkeypatch.setattr(pairs, "generate", by_prompt)
    metrics = pairs.main(*parse((pairs.PairsArgs, SamplingConfig, RunArgs), [
        "--config", "configs/pairs.yaml", "--runs_dir", str(runs_dir), "--run", "order", "--model_config", profile,
        "--prompts_file", str(prompts_file), "--num_responses", "3", "--max_prompt_tokens", "256"]))
    ds = datasets.load_from_disk(str(runs_dir / "order/pairs/dataset"))
    assert metrics["prompts"] == 4 and len(asked) == 12 and metrics["pairs"] == len(ds) == 4 * 3
    for row in ds:
        name = row["prompt"][0]["content"]
        assert all(r.startswith(name + " #") for r in row["responses"]), row
        i, j = row["response_indices"]
        first = int(row["responses"][0].split("#")[1]) - i  # the prompt's first response's index in the batch
        assert int(row["responses"][1].split("#")[1]) == first + j and row["ended"] == [(first + i) % 4 != 0,
                                                                                        (first + j) % 4 != 0]
    assert metrics["no_eos_fraction"] == 0.25


def test_the_runs_seed_draws_the_prompts_and_the_samples_and_a_prompt_of_max_prompt_tokens_is_kept(
        tiny_models, runs_dir, tmp_path, monkeypatch, capsys):
    """--seed draws the prompts (max_prompts takes the first of datasets' shuffle with that seed: another seed takes
    others) and seeds the sampler; max_prompt_tokens is inclusive: a prompt exactly that long (with the chat template)
    is kept, a longer one is left out, counted and named in a note (a real template's system prompt once left most of
    the story openings out, and only the summary table said so)."""
    import datasets
    import torch

    import stages.pairs as pairs
    from pipeline.config import RunArgs, parse
    from pipeline.data import load_any
    from pipeline.generation import Generations, SamplingConfig, encode_prompts
    from pipeline.models import load_tokenizer, profile_from

    many = tmp_path / "many.jsonl"
    many.write_text("".join(json.dumps({"prompt": f"prompt number {i}"}) + "\n" for i in range(12)))
    taken = {}
    for seed in (7, 8):
        got, _ = pairs.load_prompts(pairs.PairsArgs(prompts_file=str(many), max_prompts=3, seed=seed))
        assert got == [pairs.as_messages(r["prompt"]) for r in load_any(str(many)).shuffle(seed=seed)][:3]
        taken[seed] = got
    assert taken[7] != taken[8]

    profile = str(tiny_models["llama"])
    make_sft_run(runs_dir, "lim", profile)
    texts = ["a fox", "a fox and a hen", "a fox and a hen and a dog by the old mill"]
    lengths = [len(ids) for ids in encode_prompts(load_tokenizer(profile_from(profile)),
                                                  [[{"role": "user", "content": t}] for t in texts])]
    assert lengths[0] < lengths[1] < lengths[2]
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    seeds = []

    def numbered(model, tokenizer, prompt_ids, sampling, generator_seed=None, progress=False, batches_store=None):
        seeds.append(generator_seed)
        n = len(prompt_ids)
        return Generations(torch.zeros(n, 1, dtype=torch.long), torch.ones(n, 1, dtype=torch.long),
                           torch.ones(n, 2, dtype=torch.long), torch.ones(n, 2, dtype=torch.long),
                           [f"reply {i}" for i in range(n)], torch.ones(n, dtype=torch.bool))

    monkeypatch.setattr(pairs, "generate", numbered)
    metrics = pairs.main(*parse((pairs.PairsArgs, SamplingConfig, RunArgs), [
        "--config", "configs/pairs.yaml", "--runs_dir", str(runs_dir), "--run", "lim", "--model_config", profile,
        "--prompts_file", str(prompts_file), "--seed", "7", "--max_prompt_tokens", str(lengths[1])]))
    ds = datasets.load_from_disk(str(runs_dir / "lim/pairs/dataset"))
    assert seeds == [7] and ds[0]["generation"]["seed"] == 7
    assert metrics["prompts"] == 2 and metrics["prompts_too_long"] == 1
    assert (f"note: 1 of 3 prompts of {prompts_file} are longer than max_prompt_tokens={lengths[1]} tokens (with the chat "
            f"template; longest {lengths[2]}): they were left out; raise --max_prompt_tokens to keep them"
            ) in capsys.readouterr().err
    assert sorted({row["prompt"][0]["content"] for row in ds}) == texts[:2]


def test_an_interrupted_run_keeps_its_sampled_batches_and_ends_as_an_uninterrupted_one(tiny_models, runs_dir,
                                                                                        monkeypatch, capsys):
    """resume == no resume: `make pairs` killed after 3 of its 6 batches, run again with the same command, samples
    batches 3-5 only and gives the uninterrupted run's pairs, to the byte; its kept batches are gone once it has
    finished. Another command line after a kill starts over, with a note."""
    import datasets

    import stages.resume as resume
    from pipeline.config import RunArgs, parse
    from pipeline.generation import SamplingConfig
    from stages.pairs import PairsArgs, main
    from tests.killed_stage import dying_put

    profile = str(tiny_models["llama"])
    put, sampled = resume.SampledBatches.put, []

    def run(name, *extra, kill_after=None):
        sampled.clear()
        monkeypatch.setattr(resume.SampledBatches, "put", dying_put(put, kill_after, sampled))
        args = ["--config", "configs/pairs.yaml", "--runs_dir", str(runs_dir), "--run", name, "--model_config", profile,
                *TINY, "--generation_batch_size", "2", *extra]
        return main(*parse((PairsArgs, SamplingConfig, RunArgs), args))

    def pairs_of(name):
        ds = datasets.load_from_disk(str(runs_dir / name / "pairs" / "dataset"))
        return [(r["pair_id"], r["prompt"], r["responses"], r["ended"]) for r in ds]

    for name in ("whole", "cut", "other"):
        make_sft_run(runs_dir, name, profile)  # the same adapter each time (seed 0)
    whole = run("whole")
    assert sampled == [0, 1, 2, 3, 4, 5] and whole["batches_kept_from_an_interrupted_run"] == 0
    with pytest.raises(RuntimeError, match="killed after 3 batches"):
        run("cut", kill_after=3)
    kept_dir = runs_dir / "cut" / "pairs" / "sampled"
    assert sorted(p.name for p in kept_dir.glob("batch-*")) == ["batch-000000.pt", "batch-000001.pt", "batch-000002.pt"]
    capsys.readouterr()
    cut = run("cut")
    assert "note: 3 batches sampled by an interrupted run of the same command are kept" in capsys.readouterr().err
    assert sampled == [3, 4, 5] and cut["batches_kept_from_an_interrupted_run"] == 3
    # tokens/s is of what this run sampled: the kept batches' tokens are not counted (they made it 1.7x too high)
    assert 0 < cut["new_tokens"] < whole["new_tokens"], (cut["new_tokens"], whole["new_tokens"])
    assert pairs_of("cut") == pairs_of("whole") and cut["pairs"] == whole["pairs"] > 0
    assert not kept_dir.exists()

    with pytest.raises(RuntimeError, match="killed after 2 batches"):
        run("other", kill_after=2)
    capsys.readouterr()
    other = run("other", "--temperature", "0.9")  # another command line: every batch sampled at its own settings
    assert "holds batches of another command line, launch or data: starting over" in capsys.readouterr().err
    assert sampled == [0, 1, 2, 3, 4, 5] and other["batches_kept_from_an_interrupted_run"] == 0


def test_each_rank_keeps_and_reuses_only_its_own_batches(tmp_path):
    """With N processes batch b is rank b % N's (pipeline.sharding.spread); a rank that runs another's batch again,
    to keep in step, neither writes nor reads it."""
    from types import SimpleNamespace

    import torch

    from stages.resume import SampledBatches

    state = SimpleNamespace(process_index=1, num_processes=2, is_main_process=True, wait_for_everyone=lambda: None)
    store = SampledBatches(tmp_path / "sampled", {"argv": []}, state)
    t = (torch.arange(3), torch.ones(2))
    store.put(0, t)
    store.put(3, t)
    assert [p.name for p in (tmp_path / "sampled").glob("batch-*")] == ["batch-000003.pt"]
    assert store.get(0) is None and all(torch.equal(a, b) for a, b in zip(store.get(3), t)) and store.reused == 1
    # a batch file a power cut left empty or cut short is sampled again, not a traceback on every rerun; put fsyncs
    # the file before its rename names it finished, and the folder after
    store.path(5).write_bytes(b"")
    store.path(7).write_bytes(store.path(3).read_bytes()[:40])
    assert store.get(5) is None and store.get(7) is None and store.reused == 1
    synced = []
    import os as _os

    real = _os.fsync
    try:
        _os.fsync = lambda fd: synced.append(_os.readlink(f"/proc/self/fd/{fd}")) or real(fd)
        store.put(9, t)
    finally:
        _os.fsync = real
    assert synced == [str(store.path(9).with_suffix(".part")), str(tmp_path / "sampled")]


def test_the_dropped_counts_the_sampling_record_and_the_refusals_of_prompts_and_pairs(tiny_models, runs_dir, tmp_path,
                                                                                     monkeypatch):
    """K = 3 with a stand-in generate(): prompt "a fox" answered x, x, y (one identical pair, and (x, y) twice: one
    repeat), "a hen" z, z, z (three identical pairs): one row, 4 identical and 1 repeated dropped, each counted as
    such; the rows record the sampling settings as given. A text prompt is one user message; a prompt row that cannot
    be sampled from, prompts all longer than max_prompt_tokens, and responses all identical are one ConfigError each."""
    import datasets
    import torch

    import stages.pairs as pairs
    from pipeline.config import ConfigError, RunArgs, parse
    from pipeline.generation import Generations, SamplingConfig

    assert pairs.as_messages("a fox") == [{"role": "user", "content": "a fox"}]
    profile = str(tiny_models["llama"])
    make_sft_run(runs_dir, "drops", profile)
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in ("a fox", "a hen")))
    replies = {"a fox": ["x", "x", "y"], "a hen": ["z", "z", "z"]}

    def stand_in(model, tokenizer, prompt_ids, sampling, generator_seed=None, progress=False, batches_store=None):
        content = [tokenizer.decode(ids) for ids in prompt_ids]
        texts = [replies[next(t for t in replies if t in c)][i % 3] for i, c in enumerate(content)]
        n = len(texts)
        return Generations(torch.zeros(n, 1, dtype=torch.long), torch.ones(n, 1, dtype=torch.long),
                           torch.ones(n, 2, dtype=torch.long), torch.ones(n, 2, dtype=torch.long), texts,
                           torch.ones(n, dtype=torch.bool))

    monkeypatch.setattr(pairs, "generate", stand_in)
    argv = ["--config", "configs/pairs.yaml", "--runs_dir", str(runs_dir), "--run", "drops", "--model_config", profile,
            "--prompts_file", str(prompts_file), "--num_responses", "3", "--max_prompt_tokens", "256",
            "--temperature", "0.9", "--top_p", "0.8", "--top_k", "7", "--max_new_tokens", "5"]
    metrics = pairs.main(*parse((pairs.PairsArgs, SamplingConfig, RunArgs), argv))
    assert (metrics["pairs"], metrics["identical_dropped"], metrics["repeated_dropped"]) == (1, 4, 1)
    (row,) = datasets.load_from_disk(str(runs_dir / "drops/pairs/dataset"))
    assert row["prompt"] == [{"role": "user", "content": "a fox"}] and row["responses"] == ["x", "y"]
    assert row["generation"] == {"temperature": 0.9, "top_p": 0.8, "top_k": 7, "max_new_tokens": 5, "seed": 42,
                                 "num_responses": 3}

    # the longest prompt is the one checked against the base's 512 positions: a shorter one that fits beside it does
    # not let it through (it would run past them mid-sampling, after the run folder was prepared)
    from pipeline.generation import encode_prompts
    from pipeline.models import load_tokenizer, profile_from

    texts = ("a fox", "a hen and a fox")
    short, long = (len(ids) for ids in encode_prompts(load_tokenizer(profile_from(profile)),
                                                      [[{"role": "user", "content": t}] for t in texts]))
    both = tmp_path / "both.jsonl"
    both.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    new = 512 - short  # the short prompt fills the positions exactly; the long one runs past them
    with pytest.raises(ConfigError, match=rf"^the longest prompt \({long} tokens with the chat template\) and "
                                          rf"--max_new_tokens {new} make {long + new} positions, more than the base"):
        pairs.main(*parse((pairs.PairsArgs, SamplingConfig, RunArgs),
                          [*argv, "--prompts_file", str(both), "--max_new_tokens", str(new)]))
    with pytest.raises(ConfigError, match=r"^all 2 prompts of .*prompts\.jsonl are longer than max_prompt_tokens=1 "):
        pairs.main(*parse((pairs.PairsArgs, SamplingConfig, RunArgs), [*argv, "--max_prompt_tokens", "1"]))
    replies["a fox"] = ["y", "y", "y"]
    with pytest.raises(ConfigError, match="every pair had two identical responses"):
        pairs.main(*parse((pairs.PairsArgs, SamplingConfig, RunArgs), argv))
    prompts_file.write_text(json.dumps({"prompt": "a fox"}) + "\n" + json.dumps({"prompt": "   "}) + "\n")
    with pytest.raises(ConfigError, match=r"prompts\.jsonl row 2: the prompt is empty"):
        pairs.load_prompts(pairs.PairsArgs(prompts_file=str(prompts_file)))
