"""SFT stage: the real main() on the real YAML with tiny overrides, on four architectures, 1 and 2 processes."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import ConfigError, read_yaml
from stages.sft import held_out_split, load_data, main, parse_args
from tests.conftest import ARCHS, LLAMA_TARGETS, REPO, guarded_exit, on_device, run_module, run_python

SMALL_DATA = '{"data/sft/self_instruct.jsonl": 48}'


def tiny_args(profile, runs_dir, run="t", *extra):
    mixture = [] if "--dataset_name" in extra else ["--dataset_mixture", SMALL_DATA]  # beside it: refused
    return ["--config", str(REPO / "configs/sft.yaml"), "--model_config", str(profile), "--runs_dir", str(runs_dir),
            "--run", run, *mixture, "--max_steps", "20", "--logging_steps", "1",
            "--learning_rate", "3e-2", "--warmup_steps", "0", "--lr_scheduler_type", "constant",
            "--per_device_train_batch_size", "4", "--max_length", "128", "--eval_fraction", "0.1",
            "--sample_max_new_tokens", "8", "--lora_dropout", "0.0", *extra]


@pytest.mark.parametrize("arch", ARCHS)
def test_sft_trains_each_architecture(arch, tiny_models, runs_dir):
    metrics = main(*parse_args(tiny_args(tiny_models[arch], runs_dir)))
    curve = metrics["loss_curve"]
    assert sum(curve[-5:]) / 5 < sum(curve[:3]) / 3 - 0.3, curve  # the loss falls
    stage = runs_dir / "t" / "sft"
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["outputs"]["adapter"] == str(stage / "adapter")
    assert manifest["metrics"]["eval_loss"] is not None and manifest["metrics"]["tokens_per_s"] > 0
    held_out = held_out_split(load_data(parse_args(tiny_args(tiny_models[arch], runs_dir))[1], 42)[0], 0.1, 42)
    m = manifest["metrics"]
    # TRL leaves out the rows with no reply token within max_length (128 here): the manifest counts what trained
    assert (m["train_rows"] + m["rows_left_out"], m["eval_rows"]) == tuple(map(len, held_out)), m
    assert m["rows_left_out"] == rows_with_no_reply_within_max_length(tiny_models[arch], runs_dir), m
    assert manifest["versions"]["trl"] and manifest["config"]["train"]["learning_rate"] == 3e-2
    assert (stage / "config.json").is_file()
    samples = json.loads((stage / "samples.json").read_text())  # the YAML's sample prompts: story openings
    assert [s["prompt"] for s in samples] == read_yaml(REPO / "configs/sft.yaml")["sample_prompts"]
    assert all(isinstance(s["before"], str) and isinstance(s["after"], str) for s in samples)
    weights = load_file(stage / "adapter" / "adapter_model.safetensors")
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    assert lora_b and all(torch.count_nonzero(w) > 0 for w in lora_b)  # B starts at zero: nonzero means it trained
    assert (stage / "adapter" / "tokenizer_config.json").is_file()


def rows_with_no_reply_within_max_length(profile, runs_dir) -> int:
    """The training rows whose first max_length tokens hold no assistant token, counted from our own masks."""
    from pipeline.models import load_tokenizer, profile_from
    from stages.sft import kept, split_and_tokenize

    train_cfg, args, run = parse_args(tiny_args(profile, runs_dir))
    ds, name = load_data(args, train_cfg.seed)
    train_ds, _ = split_and_tokenize(ds, load_tokenizer(profile_from(run.model_config)), train_cfg, args, name)
    return sum(1 not in kept(mask, train_cfg.max_length, train_cfg.truncation_mode) for mask in train_ds["assistant_masks"])


def test_adapter_loads_with_stock_autopeft_in_fresh_process(tiny_models, runs_dir, tmp_path):
    main(*parse_args(tiny_args(tiny_models["llama"], runs_dir, "reload", "--max_steps", "2")))
    adapter = runs_dir / "reload" / "sft" / "adapter"
    script = (
        "import sys, torch\n"
        "from peft import AutoPeftModelForCausalLM\n"
        "from transformers import AutoTokenizer\n"
        f"m = AutoPeftModelForCausalLM.from_pretrained(r'{adapter}')\n"
        f"t = AutoTokenizer.from_pretrained(r'{adapter}')\n"
        "ids = t.apply_chat_template([{'role': 'user', 'content': 'Hi'}], add_generation_prompt=True, return_tensors='pt', return_dict=True)\n"
        "out = m.generate(**ids, max_new_tokens=5, do_sample=False, min_new_tokens=5)\n"
        "assert out.shape[1] == ids['input_ids'].shape[1] + 5, out.shape\n"
        "print('GENERATED', out.shape[1] - ids['input_ids'].shape[1])\n"
    )
    # from another working directory: the adapter must not depend on the cwd
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "GENERATED 5" in res.stdout


@pytest.mark.slow
def test_two_processes_match_one_process(tiny_models, runs_dir):
    """Same global batch (1x8 against 2x4): the per-step loss curves agree. The two processes are launched with
    ACCELERATE_USE_CPU=0, as a plain `accelerate launch --config_file configs/accelerate/cpu2.yaml` is (make sets 1):
    on a machine with no GPU they are counted as two CPU ranks all the same (each trained alone on all the data)."""
    profile = tiny_models["llama"]
    # A moderate learning rate: at 3e-2 Adam turns last-bit differences in near-zero gradients into full-size steps.
    common = ["--max_steps", "6", "--eval_fraction", "0", "--learning_rate", "2e-3"]
    one = run_module("stages.sft", tiny_args(profile, runs_dir, "one", *common, "--per_device_train_batch_size", "8"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_module("stages.sft", tiny_args(profile, runs_dir, "two", *common, "--per_device_train_batch_size", "4"),
                     processes=2, env={"ACCELERATE_USE_CPU": "0"})
    assert two.returncode == 0, two.stderr[-3000:]
    m1 = json.loads((runs_dir / "one/sft/manifest.json").read_text())["metrics"]
    m2 = json.loads((runs_dir / "two/sft/manifest.json").read_text())["metrics"]
    assert m1["world_size"] == 1 and m2["world_size"] == 2
    assert len(m1["loss_curve"]) == len(m2["loss_curve"]) == 6
    # 30 training rows: step 4 ends the epoch with 6 of them, 4 on rank 0 and 2 on rank 1, whose last batch accelerate
    # fills with 2 rows from the epoch's start at weight 0 (stages/epoch_end.py; trained again, they moved the loss by
    # 0.09 at step 4 and the later steps by 3e-3). Every step is the same computation split in two.
    assert m1["train_rows"] == m2["train_rows"] == 30, m1
    diffs = [abs(a - b) for a, b in zip(m1["loss_curve"], m2["loss_curve"])]
    # Seen: at most 9.5e-7 (a few float32 ulps of the loss): 1e-5 leaves room for another reduction order only.
    assert max(diffs) < 1e-5, (m1["loss_curve"], m2["loss_curve"])


@pytest.mark.slow
def test_two_processes_match_one_process_packed_across_an_epochs_end(tiny_models, runs_dir):
    """Packed without padding (`--packing true`): a batch's rows lie end to end, each of several conversations, and
    the rows accelerate fills rank 1's last batch of the epoch with are cut off by their lengths, not where a
    conversation starts (which took a real row's tokens out: the curves parted by 0.05 at the epoch's end)."""
    profile = tiny_models["llama"]
    common = ["--max_steps", "8", "--eval_fraction", "0", "--learning_rate", "2e-3", "--packing", "true",
              "--max_length", "256"]
    one = run_module("stages.sft", tiny_args(profile, runs_dir, "one", *common, "--per_device_train_batch_size", "8"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_module("stages.sft", tiny_args(profile, runs_dir, "two", *common, "--per_device_train_batch_size", "4"),
                     processes=2, env={"ACCELERATE_USE_CPU": "0"})
    assert two.returncode == 0, two.stderr[-3000:]
    m1, m2 = (json.loads((runs_dir / n / "sft/manifest.json").read_text())["metrics"] for n in ("one", "two"))
    assert m1["world_size"] == 1 and m2["world_size"] == 2 and m1["packed_rows"] % 8 != 0 and m1["packed_rows"] < 8 * 8, m1
    assert m1["rows_left_out"] is None and m1["train_rows"] == m2["train_rows"] > m1["packed_rows"], m1
    diffs = [abs(a - b) for a, b in zip(m1["loss_curve"], m2["loss_curve"])]
    assert len(diffs) == 8 and max(diffs) < 1e-5, (m1["loss_curve"], m2["loss_curve"])  # seen: at most 9.5e-7


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["ddp", "fsdp"])
def test_two_processes_resume_an_interrupted_run_and_end_as_an_uninterrupted_one(launch, tiny_models, runs_dir):
    """resume == no resume under DDP and on a base sharded by FSDP2: two processes killed after step 7
    (tests/killed_stage.py), then the same command again, end with the uninterrupted two-process run's adapter, to the
    bit, and its loss curve. LoRA dropout on: each rank's random state comes back from the checkpoint too. (Ranks that
    resume from different steps fall out of step and wait on each other until the timeout.)"""
    def args(name):
        return tiny_args(tiny_models["llama"], runs_dir, name, "--save_strategy", "steps", "--save_steps", "3",
                         "--max_steps", "10", "--eval_fraction", "0", "--lora_dropout", "0.1")

    two = {"fsdp": True} if launch == "fsdp" else {"processes": 2}
    whole = run_module("stages.sft", args("whole"), timeout=300, **two)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = run_module("tests.killed_stage", ["stages.sft", "7", *args("cut")], timeout=300, **two)
    assert killed.returncode != 0 and "killed at step 7" in killed.stderr, killed.stderr[-3000:]
    trainer_dir = runs_dir / "cut" / "sft" / "trainer"
    assert sorted(p.name for p in trainer_dir.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert {p.name for p in (trainer_dir / "checkpoint-6").glob("rng_state*")} == {"rng_state_0.pth", "rng_state_1.pth"}
    # each rank draws its own dropout masks (seed + rank): the same state on both drew rank 0's masks for rank 1's rows
    states = [torch.load(trainer_dir / "checkpoint-6" / f"rng_state_{r}.pth", weights_only=False)["cpu"] for r in (0, 1)]
    assert not torch.equal(*states)
    resumed = run_module("stages.sft", args("cut"), timeout=300, **two)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count(f"note: resuming from {trainer_dir / 'checkpoint-6'}") == 1  # the main process says it
    m_whole, m_cut = (json.loads((runs_dir / n / "sft/manifest.json").read_text())["metrics"] for n in ("whole", "cut"))
    assert m_whole["world_size"] == m_cut["world_size"] == 2
    assert {m_whole["sharding"]["engine"], m_cut["sharding"]["engine"]} == {"fsdp2" if launch == "fsdp" else "none"}
    assert m_cut["resumed_from_step"] == 6 and m_whole["resumed_from_step"] is None
    assert m_cut["loss_curve"] == m_whole["loss_curve"] and len(m_cut["loss_curve"]) == 10
    # the Trainer's log lines: steps 7-10 trained again, not 1-10 (the curve above comes partly from the checkpoint)
    assert resumed.stdout.count("{'loss': ") == 4 and whole.stdout.count("{'loss': ") == 10
    a, b = (load_file(runs_dir / n / "sft/adapter/adapter_model.safetensors") for n in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(trainer_dir.glob("checkpoint-*"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("case", ["missing_file", "no_messages", "empty", "missing_base", "bad_key"])
def test_bad_input_one_clear_error_and_no_manifest(case, tiny_models, runs_dir, tmp_path, capsys):
    extra, expect = [], None
    if case == "missing_file":
        extra, expect = ["--dataset_name", str(tmp_path / "nope.jsonl")], "does not exist"
    elif case == "no_messages":
        extra, expect = ["--dataset_name", str(write_jsonl(tmp_path / "x.jsonl", [{"text": "hi"}]))], "no column(s) ['messages']"
    elif case == "empty":
        (tmp_path / "e.jsonl").write_text("")
        extra, expect = ["--dataset_name", str(tmp_path / "e.jsonl")], "empty"
    elif case == "missing_base":
        prof = tmp_path / "m.yaml"
        prof.write_text(f"name_or_path: {tmp_path / 'no_such_model'}\n")
        extra, expect = ["--model_config", str(prof)], "does not exist"
    elif case == "bad_key":
        extra, expect = ["--lora_rr", "4"], "lora_rr"
    args = tiny_args(tiny_models["llama"], runs_dir, "bad", *extra)
    if case == "missing_file":  # one case as `make sft` runs it: a fresh process and its exit code
        res = run_python("stages.sft", args)
        code, stderr = res.returncode, res.stderr
    else:  # the others through the same guard in this process
        code, stderr = guarded_exit(lambda: main(*parse_args(args)), capsys)
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    err_lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1 and expect in err_lines[0], stderr[-2000:]
    assert not (runs_dir / "bad" / "sft" / "manifest.json").exists()


@pytest.mark.parametrize("stage", ["sft", "rm"])
@pytest.mark.parametrize("flag,value,fix", [
    ("--chat_template_path", "my_template.jinja", "remove it and set chat_template: my_template.jinja in the model "
                                                  "profile ({profile}) instead (a .jinja file or the template text)"),
    ("--eos_token", "<|im_end|>", "remove it; to end turns with another token, give the model profile ({profile}) a "
                                  "chat_template: that ends them with it")])
def test_trl_tokenizer_options_are_refused_for_the_profiles(stage, flag, value, fix, tiny_models, runs_dir, capsys):
    """TRL's SFTConfig/RewardConfig chat_template_path and eos_token change the tokenizer inside the trainer, after the
    stage has tokenized its data with the profile's: the data and the saved tokenizer disagreed. One error line naming
    the flag and the profile, before the run folder exists."""
    from stages import rm

    profile = tiny_models["llama"]
    argv = tiny_args(profile, runs_dir, "bad", flag, value) if stage == "sft" else [
        "--config", str(REPO / "configs/rm.yaml"), "--model_config", str(profile), "--runs_dir", str(runs_dir),
        "--run", "bad", flag, value]
    run_main = (lambda: main(*parse_args(argv))) if stage == "sft" else (lambda: rm.main(*rm.parse_args(argv)))
    code, stderr = guarded_exit(run_main, capsys)
    err_lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err_lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert err_lines[0].startswith(f"error: {flag} {value}: `make {stage}` tokenizes its data with the model profile's")
    assert err_lines[0].endswith(fix.format(profile=profile)), err_lines[0]
    assert not runs_dir.exists()
    # make's check of the named stages, before any runs: `make rm` refused it only after SFT, pairs and labels
    from pipeline.launch import check

    assert check(f"stages.{stage}", argv, stage) == 2
    assert capsys.readouterr().err.strip() == err_lines[0]


def test_config_error_in_process_for_empty_mixture(tiny_models, runs_dir):
    with pytest.raises(ConfigError, match="no SFT data"):
        main(*parse_args(tiny_args(tiny_models["llama"], runs_dir, "x", "--dataset_mixture", "{}")))


# ---------------------------------------------------------------------------------------------------- real checkpoints

def test_bf16_base_trains_fp32_lora_and_samples_on_the_accelerator(tiny_models_bf16, runs_dir, monkeypatch):
    """A bf16 profile: the frozen base is bf16, the LoRA weights train (and are saved) in float32, the losses are
    finite. The "before" samples run on this process's accelerator (accelerate's PartialState().device). Before and
    after are sampled alike, so they compare: the same settings (sampled, not greedy: greedy decoding of a tiny
    model collapses to "\\n" + EOS; --sample_max_new_tokens new tokens) and the same fixed seed."""
    from accelerate import PartialState

    import stages.sft as sft

    moved, sampled_on = [], []
    real_to_device, real_generate = sft.to_device, sft.generate
    monkeypatch.setattr(sft, "to_device", lambda model, device=None: moved.append(model) or real_to_device(model, device))
    monkeypatch.setattr(sft, "generate", lambda model, tok, prompts, cfg, **k: sampled_on.append(
        (model, next(model.parameters()).device, cfg, k.get("generator_seed"))) or real_generate(model, tok, prompts, cfg, **k))
    metrics = main(*parse_args(tiny_args(tiny_models_bf16["llama"], runs_dir, "bf16", "--max_steps", "6")))
    assert metrics["base_dtypes"] == ["bfloat16"] and metrics["trainable_dtypes"] == ["float32"]
    assert all(math.isfinite(x) for x in metrics["loss_curve"]) and math.isfinite(metrics["eval_loss"])
    weights = load_file(runs_dir / "bf16" / "sft" / "adapter" / "adapter_model.safetensors")
    assert weights and {w.dtype for w in weights.values()} == {torch.float32}
    assert sampled_on[0][0] is moved[0] and on_device({d for _, d, _, _ in sampled_on}, PartialState().device)
    (_, _, before, before_seed), (_, _, after, after_seed) = sampled_on
    assert before == after and before.temperature > 0 and before.max_new_tokens == 8  # tiny_args' sample_max_new_tokens
    assert before_seed == after_seed is not None


def test_before_and_after_samples_run_under_the_launch_mixed_precision(tiny_models, runs_dir, monkeypatch):
    """The accelerate config's `mixed_precision: bf16` (configs/accelerate/multi_gpu.yaml): the training gets it from
    accelerate, and the before/after samples run under the same autocast, so the two compare."""
    import stages.sft as sft

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    seen, real_generate = [], sft.generate

    def spy(model, *a, **k):
        device = next(model.parameters()).device.type  # the accelerator's, on a GPU machine
        seen.append(torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None)
        return real_generate(model, *a, **k)

    monkeypatch.setattr(sft, "generate", spy)
    main(*parse_args(tiny_args(tiny_models["llama"], runs_dir, "mixed", "--max_steps", "2")))
    assert seen == [torch.bfloat16, torch.bfloat16]


def write_profile(path, **spec):
    import yaml

    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def base_without_template(tiny_models, tmp_path):
    """The llama fixture model with its chat template removed, as pretrained-only checkpoints ship."""
    import shutil

    import yaml

    src = yaml.safe_load(open(tiny_models["llama"]))["name_or_path"]
    dst = tmp_path / "no_template"
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").unlink()
    return dst


def test_base_without_chat_template_is_refused_before_the_run_folder(base_without_template, runs_dir, tmp_path):
    profile = write_profile(tmp_path / "p.yaml", name_or_path=str(base_without_template), lora_target_modules=LLAMA_TARGETS)
    with pytest.raises(ConfigError, match="has no chat template: add `chat_template:` to the model profile"):
        main(*parse_args(tiny_args(profile, runs_dir, "nt")))
    assert not (runs_dir / "nt").exists()


@pytest.mark.parametrize("how", ["file", "inline"])
def test_profile_chat_template_serves_a_base_without_one(how, base_without_template, runs_dir, tmp_path):
    from stages.base import CHAT_TEMPLATE

    template = str(REPO / "models/tiny/chat_template.jinja") if how == "file" else CHAT_TEMPLATE
    profile = write_profile(tmp_path / "p.yaml", name_or_path=str(base_without_template), lora_target_modules=LLAMA_TARGETS,
                            chat_template=template)
    from pipeline.models import load_tokenizer, profile_from

    assert load_tokenizer(profile_from(str(profile))).chat_template == (REPO / "models/tiny/chat_template.jinja").read_text()
    if how == "file":  # the whole stage once: it trains, and the adapter carries the template
        from transformers import AutoTokenizer

        main(*parse_args(tiny_args(profile, runs_dir, "pt", "--max_steps", "2")))
        assert AutoTokenizer.from_pretrained(runs_dir / "pt" / "sft" / "adapter").chat_template == CHAT_TEMPLATE


def test_missing_chat_template_file_is_one_clear_error(tiny_models, tmp_path):
    from pipeline.models import load_tokenizer, profile_from

    import yaml

    profile = write_profile(tmp_path / "p.yaml", **{**yaml.safe_load(open(tiny_models["llama"])),
                                                   "chat_template": str(tmp_path / "nope.jinja")})
    with pytest.raises(ConfigError, match="nope.jinja of the model profile does not exist"):
        load_tokenizer(profile_from(str(profile)))


def test_a_lora_target_matches_a_whole_module_name_not_the_end_of_one(tiny_models):
    """peft matches a target by the module's name or its last dotted parts (`attn.c_attn` ends in `.c_attn`), never by
    a bare suffix: `attn` wraps nothing in GPT-2 (its attention block is no linear layer), so the profile is refused
    although `c_attn` ends in "attn"."""
    from pipeline.config import ModelProfile
    from pipeline.models import check_lora_targets, load_base, load_tokenizer, profile_from

    path = profile_from(str(tiny_models["gpt2"])).name_or_path
    ok = ModelProfile(name_or_path=path, lora_target_modules=["c_attn", "attn.c_proj"])
    model = load_base(ok, load_tokenizer(ok))  # a dotted suffix of whole names matches
    with pytest.raises(ConfigError, match=r"LoRA target module\(s\) \['attn', 'proj'\] are not in"):
        check_lora_targets(ModelProfile(name_or_path=path, lora_target_modules=["c_attn", "attn", "proj"]), model, path)
    with pytest.raises(ConfigError, match=r"no LoRA target modules are set for .* \(gpt2\): set lora_target_modules"):
        check_lora_targets(ModelProfile(name_or_path=path, lora_target_modules=[]), model, path)  # nothing to train


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox"])
def test_the_output_and_score_heads_are_neither_offered_nor_taken_as_lora_targets(arch, tiny_models):
    """The layer list a wrong target's error offers held the LM head (lm_head; GPT-NeoX's embed_out): a user who took
    it got TRL's traceback from SFT after the run folder was written. The heads are refused by name, and not offered."""
    import re

    from pipeline.config import ModelProfile
    from pipeline.models import check_lora_targets, linear_layer_names, load_base, load_tokenizer, profile_from
    from tests.conftest import ARCH_TARGETS

    path = profile_from(str(tiny_models[arch])).name_or_path
    profile = ModelProfile(name_or_path=path, lora_target_modules=ARCH_TARGETS[arch])
    for kind in ("causal", "score"):
        model = load_base(profile, load_tokenizer(profile), kind)
        head = "score" if kind == "score" else next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
        assert head in ("lm_head", "embed_out", "score") and head not in linear_layer_names(model)
        assert sorted(linear_layer_names(model)) == sorted(ARCH_TARGETS[arch])  # every other linear layer
        bad = ModelProfile(name_or_path=path, lora_target_modules=[ARCH_TARGETS[arch][0], head])
        with pytest.raises(ConfigError, match=rf"LoRA target module\(s\) \['{head}'\] of .* \({arch}\) are its output or "
                                              rf"score head, .*: {re.escape(str(linear_layer_names(model)))}$"):
            check_lora_targets(bad, model, path)


@pytest.mark.parametrize("targets", [None, ["c_attn", "q_prj"]])
def test_wrong_lora_targets_name_the_models_linear_layers(targets, tiny_models, runs_dir, tmp_path):
    """A GPT-2 profile without lora_target_modules (the Llama projections by default), or with a typo: one error
    naming the layers GPT-2 has, before the run folder is touched (peft would raise NoMatchingPeftModuleError, or
    silently skip the typo)."""
    import yaml

    spec = yaml.safe_load(open(tiny_models["gpt2"]))
    spec = {"name_or_path": spec["name_or_path"], **({"lora_target_modules": targets} if targets else {})}
    profile = write_profile(tmp_path / "gpt2.yaml", **spec)
    missing = "q_prj" if targets else "q_proj"
    with pytest.raises(ConfigError, match=rf"LoRA target module\(s\) \[.*'{missing}'.*\] are not in .*\(gpt2\): set "
                                          r"lora_target_modules in the model profile to some of its linear layers: "
                                          r"\['c_attn', 'c_fc', 'c_proj'\]$"):
        main(*parse_args(tiny_args(profile, runs_dir, "lt")))
    assert not (runs_dir / "lt").exists()


def test_rows_without_an_assistant_reply_with_text_are_left_out(capsys):
    """A row whose assistant turns are empty or whitespace would teach only "stop at once": left out, with a note;
    the rest come back as plain conversations; none left is one clear error."""
    from datasets import Dataset

    from stages.sft import with_replies

    user = {"role": "user", "content": "Go on."}
    rows = [[user, {"role": "assistant", "content": "The cat sat."}], [user, {"role": "assistant", "content": " \n "}],
            [user], [user, {"role": "assistant", "content": ""}, {"role": "assistant", "content": "Yes."}]]
    kept = with_replies(Dataset.from_list([{"messages": m} for m in rows]), "rows.jsonl")
    assert kept.to_list() == [{"messages": rows[0], "row": 1, "first_trained": 0},
                              {"messages": rows[3], "row": 4, "first_trained": 0}]  # the file's rows
    assert "2 of 4 rows of rows.jsonl have no assistant reply with text: left out" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no row of none.jsonl has an assistant reply with text"):
        with_replies(Dataset.from_list([{"messages": m} for m in rows[1:3]]), "none.jsonl")


def test_prompt_completion_rows_train_as_conversations(tmp_path):
    """TRL's prompt-completion format (text, or lists of messages): before, plain text trained without the chat
    template (pairs, PPO and eval prompt with it) and assistant_only_loss made TRL refuse it after the run folder was
    prepared. Now each row is the conversation prompt then completion, checked and masked like every other."""
    from stages.sft import SFTArgs, load_data

    rows = [{"prompt": "What is 2 plus 2?", "completion": "It is 4."},
            {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
             "completion": [{"role": "assistant", "content": "Hello."}]},
            {"prompt": "Say nothing.", "completion": "  "},
            # a prompt with an assistant turn of its own and an empty completion: nothing of the completion to learn
            {"prompt": [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "B."},
                        {"role": "user", "content": "C?"}], "completion": ""}]
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds, name = load_data(SFTArgs(dataset_name=str(data)), 0)
    assert ds.to_list() == [
        {"messages": [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "It is 4."}],
         "row": 1, "first_trained": 1},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                      {"role": "assistant", "content": "Hello."}], "row": 2, "first_trained": 2}]  # 3, 4: no reply
    data.write_text(json.dumps({"prompt": "Hi?", "completion": 7}) + "\n")
    with pytest.raises(ConfigError, match=r"^row 1 of .*pc\.jsonl: its completion is int: give text or a list of "):
        load_data(SFTArgs(dataset_name=str(data)), 0)


def test_a_prompt_completion_rows_loss_is_on_the_completion_alone(tiny_models):
    """A prompt that holds an assistant turn of its own (a conversation so far) is context: the loss is on the
    completion (TRL's completion-only loss), not on the prompt's reply too, as when the row was read as a
    conversation whose every assistant turn trains. A messages row keeps every assistant turn. Mutant: the prompt's
    assistant turns masked in."""
    from datasets import Dataset

    from pipeline.chat import require_end_of_turn
    from pipeline.models import load_tokenizer, profile_from
    from stages.sft import with_assistant_masks

    tok = load_tokenizer(profile_from(str(tiny_models["llama"])))
    eot = require_end_of_turn(tok)
    messages = [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "PROMPTREPLY"},
                {"role": "user", "content": "C?"}, {"role": "assistant", "content": "COMPLETION"}]
    trained = []
    for first in (3, 0):  # a prompt-completion row (its prompt: 3 messages); a messages row
        row = with_assistant_masks(Dataset.from_list([{"messages": messages, "row": 1, "first_trained": first}]), tok,
                                   eot, "rows")[0]
        trained.append(tok.decode([t for t, m in zip(row["input_ids"], row["assistant_masks"]) if m]))
    assert "COMPLETION" in trained[0] and "PROMPTREPLY" not in trained[0] and trained[0].endswith(eot.strip())
    assert "PROMPTREPLY" in trained[1] and "COMPLETION" in trained[1]


def test_prompt_completion_data_trains_through_the_chat_template(tiny_models, runs_dir, tmp_path):
    """The stage end to end on prompt-completion text rows with the default assistant_only_loss: it trains (TRL
    refused the rows, after the run folder was prepared)."""
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "completion": f"It is {2 * i}."} for i in range(40)]
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = tiny_args(tiny_models["llama"], runs_dir, "pc", "--dataset_name", str(data), "--max_steps", "2")
    metrics = main(*parse_args(args))
    assert metrics["train_loss"] > 0 and (runs_dir / "pc" / "sft" / "manifest.json").is_file()


def test_your_own_data_is_sampled_on_its_own_held_out_openings(tiny_models, runs_dir, tmp_path):
    """samples.json answered the config's sample prompts (the story recipe's book openings) whatever the data: with
    your --dataset_name on the command line it answers your data's first held-out conversations (the turns before the
    first reply, a system turn too); with --sample_prompts given as well, those; a recipe YAML that names its own data
    keeps its own prompts. Mutant: the config's prompts kept."""
    from datasets import Dataset

    from stages.sft import held_out_split, sample_conversations

    rows = [{"messages": [{"role": "system", "content": f"You count {i}."}, {"role": "user", "content": f"Count to {i}."},
                          {"role": "assistant", "content": " ".join(str(k) for k in range(1, i % 5 + 2))}]}
            for i in range(40)]
    data = tmp_path / "count.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = tiny_args(tiny_models["llama"], runs_dir, "own", "--dataset_name", str(data), "--max_steps", "1",
                     "--eval_fraction", "0.25")
    metrics = main(*parse_args(args))
    samples = json.loads((runs_dir / "own" / "sft" / "samples.json").read_text())
    held_out = held_out_split(Dataset.from_list(rows), 0.25, 42)[1]  # tiny_args leaves the seed at the default's 42
    assert metrics["train_loss"] > 0 and [s["conversation"] for s in samples] == [r["messages"][:2] for r in held_out][:4]
    assert [s["prompt"] for s in samples] == [r["messages"][1]["content"] for r in held_out][:4]
    # nothing held out: the first rows, in the file's order
    _, sft_args, _ = parse_args(args[:-2] + ["--eval_fraction", "0"])
    assert sft_args.sample_prompts == []
    assert sample_conversations(sft_args, Dataset.from_list(rows), 0.0, 42) == [r["messages"][:2] for r in rows[:4]]
    # your own prompts on the command line; a recipe's YAML that names its data and its prompts: the prompts it gives
    own = ["Count to 3.", "Count to 4."]
    assert parse_args(args + ["--sample_prompts", *own])[1].sample_prompts == own
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(f"base_config: {REPO / 'configs/sft.yaml'}\ndataset_name: {data}\nsample_prompts: {json.dumps(own)}\n")
    assert parse_args(["--config", str(recipe)])[1].sample_prompts == own
    # a recipe's YAML that names its data (dataset_name or dataset_mixture) over configs/sft.yaml and no prompts: the
    # story's book openings were its samples (and the published card's example); now its data's openings, as on the
    # command line; so does --dataset_mixture on the command line. The story recipe itself keeps its openings.
    story = read_yaml(REPO / "configs/sft.yaml")["sample_prompts"]
    for line in (f"dataset_name: {data}", f"dataset_mixture: {{{data}: 0}}"):
        recipe.write_text(f"base_config: {REPO / 'configs/sft.yaml'}\n{line}\n")
        assert parse_args(["--config", str(recipe)])[1].sample_prompts == []
    mixture = ["--dataset_mixture", json.dumps({str(data): 0})]
    assert parse_args(["--config", str(REPO / "configs/sft.yaml"), *mixture])[1].sample_prompts == []
    assert parse_args(["--config", str(REPO / "configs/sft.yaml")])[1].sample_prompts == story
    bundled = ["--dataset_mixture", json.dumps({"data/story/sft.jsonl": 0})]  # the project's own files: its prompts
    assert parse_args(["--config", str(REPO / "configs/sft.yaml"), *bundled])[1].sample_prompts == story
    recipe.write_text(f"base_config: {REPO / 'configs/sft.yaml'}\nmax_steps: 3\n")
    assert parse_args(["--config", str(recipe)])[1].sample_prompts == story


def test_a_yaml_naming_its_data_and_no_prompts_anywhere_keeps_the_default_prompts(tmp_path):
    """A config with no sample_prompts at any level (no base_config) that names its own data: the default prompts,
    generic, stay (data_named_above_sample_prompts: only prompts set at a lower level than the data are dropped)."""
    from stages.sft import FIXED_PROMPTS

    data = tmp_path / "count.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]})
                    + "\n")
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(f"bf16: false\ndataset_mixture: {{{data}: 0}}\n")  # no base_config: CPU needs bf16 off
    assert parse_args(["--config", str(recipe)])[1].sample_prompts == FIXED_PROMPTS


@pytest.mark.parametrize("rows", [True, -1])
def test_an_sft_mixtures_rows_must_be_a_whole_number_not_negative_nor_a_bool(rows):
    """true (YAML's yes) read as 1 row, -1 as none of the file (range(-1)): both refused at parse."""
    from stages.sft import SFTArgs

    with pytest.raises(ValueError, match=r"dataset_mixture\['data/story/sft.jsonl'\] is .*a whole number"):
        SFTArgs(dataset_mixture={"data/story/sft.jsonl": rows})
    assert SFTArgs(dataset_mixture={"data/story/sft.jsonl": 0}).dataset_mixture == {"data/story/sft.jsonl": 0}


def test_openings_past_the_bases_positions_are_passed_over(tiny_models):
    """An opening from your data that, with sample_max_new_tokens, does not fit the base's positions is passed over for
    the next (a GPT-2 base failed mid-sampling, after the run folder was prepared); prompts you give are refused."""
    from types import SimpleNamespace

    from datasets import Dataset

    from pipeline.models import load_tokenizer, profile_from
    from stages.sft import FIXED_PROMPTS, SFTArgs, sample_conversations, sample_prompts_that_fit

    tokenizer = load_tokenizer(profile_from(str(tiny_models["llama"])))
    rows = [{"messages": [{"role": "user", "content": ("word " * 40 if i % 2 == 0 else f"Count to {i}.")},
                          {"role": "assistant", "content": "1 2"}]} for i in range(12)]
    args = SFTArgs(sample_max_new_tokens=8, eval_fraction=0.0)
    args.sample_prompts = []  # as parse_args leaves them for your --dataset_name
    conversations, prompts = sample_prompts_that_fit(args, Dataset.from_list(rows), tokenizer,
                                                     SimpleNamespace(max_position_embeddings=40), 42)
    assert [c[0]["content"] for c in conversations] == [f"Count to {i}." for i in (1, 3, 5, 7)]
    assert all(len(p) + 8 <= 40 for p in prompts)
    with pytest.raises(ConfigError, match="more than the base model's 40: lower --sample_max_new_tokens or "
                                          "--sample_prompts"):
        sample_prompts_that_fit(SFTArgs(sample_prompts=["word " * 40], sample_max_new_tokens=8),
                                Dataset.from_list(rows), tokenizer, SimpleNamespace(max_position_embeddings=40), 42)
    # the longest of the prompts you give is the one checked: a short one beside it does not let it through
    with pytest.raises(ConfigError, match="more than the base model's 40"):
        sample_prompts_that_fit(SFTArgs(sample_prompts=["Hi", "word " * 40], sample_max_new_tokens=8),
                                Dataset.from_list(rows), tokenizer, SimpleNamespace(max_position_embeddings=40), 42)
    # no opening of the rows scanned fits: the fixed prompts, not no prompt at all (max() of nothing, a traceback)
    assert sample_conversations(args, Dataset.from_list(rows), 0.0, 42, fits=lambda opening: False) == \
        [[{"role": "user", "content": p}] for p in FIXED_PROMPTS]


def test_held_out_rows_share_no_conversation_root_with_training():
    """OASST keeps sibling replies and follow-ups of one root prompt as separate rows: held-out rows must not share a
    root with a training row (eval_loss would be measured on replies seen in training). Rows whose roots are all
    distinct (the story recipe's openings) split by row exactly as before: the default run's SFT is unchanged."""
    from datasets import Dataset

    from pipeline.data import train_eval_split
    from stages.sft import conversation_root, held_out_split

    def conv(root: int, reply: str, follow_up: bool = False):
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"question {root}"},
                {"role": "assistant", "content": reply}]
        return {"messages": msgs + ([{"role": "user", "content": "and?"}, {"role": "assistant", "content": "more"}]
                                    if follow_up else [])}

    tree = Dataset.from_list([conv(i // 4, f"reply {i}", follow_up=i % 4 == 3) for i in range(80)])  # 20 roots x 4 rows
    assert len({conversation_root(r) for r in tree}) == 20
    train, held = held_out_split(tree, 0.2, seed=3)
    train_roots, held_roots = ({conversation_root(r) for r in d} for d in (train, held))
    assert len(held_roots) == 4 and not train_roots & held_roots and len(train) + len(held) == 80
    # the plain row split would have put roots on both sides
    row_train, row_held = train_eval_split(tree, 0.2, 3)
    assert {conversation_root(r) for r in row_train} & {conversation_root(r) for r in row_held}

    one_tree = Dataset.from_list([conv(0, f"reply {i}") for i in range(5)])  # nothing can be held out whole
    with pytest.raises(ConfigError, match="1 distinct prompt.* too few to hold out eval_fraction=0.2"):
        held_out_split(one_tree, 0.2, seed=3)

    distinct = Dataset.from_list([conv(i, f"reply {i}") for i in range(50)])
    assert [held_out_split(distinct, 0.2, 3)[k]["messages"] for k in (0, 1)] == \
        [train_eval_split(distinct, 0.2, 3)[k]["messages"] for k in (0, 1)]


def test_the_held_out_rows_are_drawn_with_the_runs_seed():
    """split_and_tokenize holds out the rows held_out_split draws with the run's seed (train_cfg.seed: --seed,
    which the benchmarks vary): seeds 1 and 2 hold out other rows, 4 of 40 at 0.1 each."""
    from types import SimpleNamespace

    from datasets import Dataset

    from stages.sft import SFTArgs, held_out_split, split_and_tokenize

    rows = Dataset.from_list([{"messages": [{"role": "user", "content": f"question {i}"},
                                            {"role": "assistant", "content": f"reply {i}"}]} for i in range(40)])
    held = {}
    for seed in (1, 2):
        cfg = SimpleNamespace(seed=seed, assistant_only_loss=False)  # TRL renders: no tokenizer needed here
        train, ev = split_and_tokenize(rows, None, cfg, SFTArgs(eval_fraction=0.1), "rows.jsonl")
        assert ev["messages"] == held_out_split(rows, 0.1, seed)[1]["messages"] and (len(train), len(ev)) == (36, 4)
        held[seed] = ev["messages"]
    assert held[1] != held[2]


def two_chats_and_their_masks():
    """The tiny model's tokenizer and end-of-turn token, two chats whose replies start at different tokens, and their
    rows with assistant masks (no max_length)."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from pipeline.chat import require_end_of_turn
    from stages.sft import with_assistant_masks

    tok = AutoTokenizer.from_pretrained(REPO / "models" / "tiny")
    eot = require_end_of_turn(tok)
    rows = Dataset.from_list([{"messages": [{"role": "user", "content": "Tell me about the rabbit" + " and the hen" * k},
                                            {"role": "assistant", "content": "It hid."}]} for k in (1, 4)])
    return tok, eot, rows, with_assistant_masks(rows, tok, eot, "rows.jsonl")


def test_a_max_length_that_cuts_every_assistant_token_is_refused_at_its_boundary():
    """TRL cuts each row to max_length and drops rows left without an assistant token. A max_length equal to the
    earliest assistant token's index keeps none of them (indices 0..max_length-1): one ConfigError naming the least
    max_length that works (index + 1); at that length the rows go through whole, TRL cuts them."""
    from stages.sft import with_assistant_masks

    tok, eot, rows, full = two_chats_and_their_masks()
    first = min(mask.index(1) for mask in full["assistant_masks"])
    assert first > 5 and with_assistant_masks(rows, tok, eot, "rows.jsonl", first + 1).to_list() == full.to_list()
    with pytest.raises(ConfigError, match=rf"max_length {first} is too small for rows.jsonl: no row has an assistant "
                                          rf"token within its first {first} tokens.*raise max_length to at least {first + 1}$"):
        with_assistant_masks(rows, tok, eot, "rows.jsonl", first)


def test_the_max_length_check_follows_trls_truncation_mode():
    """With truncation_mode keep_end TRL keeps each row's last max_length tokens: a max_length below the first reply's
    start keeps the reply (no error), and the least max_length that works counts back from the row's last assistant
    token. Hand-made masks, then rows of the tiny model's template (a reply, its end-of-turn, one token after it)."""
    from stages.sft import kept, tokens_to_keep_a_reply, with_assistant_masks

    mask = [0, 0, 0, 1, 1, 0]
    assert (kept(mask, 2, "keep_start"), kept(mask, 2, "keep_end")) == ([0, 0], [1, 0])
    assert (tokens_to_keep_a_reply(mask, "keep_start"), tokens_to_keep_a_reply(mask, "keep_end")) == (4, 2)
    assert tokens_to_keep_a_reply([0, 0], "keep_end") is None

    tok, eot, rows, full = two_chats_and_their_masks()
    first = min(mask.index(1) for mask in full["assistant_masks"])
    after = min(len(m) - 1 - max(i for i, bit in enumerate(m) if bit) for m in full["assistant_masks"])
    assert first > 5 and after >= 1
    assert with_assistant_masks(rows, tok, eot, "rows.jsonl", first, "keep_end").to_list() == full.to_list()
    assert with_assistant_masks(rows, tok, eot, "rows.jsonl", after + 1, "keep_end").to_list() == full.to_list()
    with pytest.raises(ConfigError, match=rf"max_length {after} is too small for rows.jsonl: no row has an assistant "
                                          rf"token within its last {after} tokens.*at least {after + 1}$"):
        with_assistant_masks(rows, tok, eot, "rows.jsonl", after, "keep_end")
    # The stage passes its training config's mode on: at max_length `first` keep_end trains, keep_start is refused
    from types import SimpleNamespace

    from stages.sft import split_and_tokenize

    def cfg(mode):
        return SimpleNamespace(seed=0, assistant_only_loss=True, max_length=first, truncation_mode=mode)
    train, _ = split_and_tokenize(rows, tok, cfg("keep_end"), SimpleNamespace(eval_fraction=0), "rows.jsonl")
    assert train.to_list() == full.to_list()
    with pytest.raises(ConfigError, match="within its first"):
        split_and_tokenize(rows, tok, cfg("keep_start"), SimpleNamespace(eval_fraction=0), "rows.jsonl")


def test_packed_rows_are_checked_at_max_length_not_at_the_longest_row():
    """With packing, TRL packs the rows into sequences of max_length: the longest row tokenized here says nothing of
    them (longest_row None), so a max_length past the base's positions is refused however short every row is."""
    from types import SimpleNamespace

    from datasets import Dataset

    from pipeline.models import check_training_length
    from stages.sft import longest_row

    rows = Dataset.from_list([{"input_ids": [1] * n, "assistant_masks": [1] * n} for n in (5, 9)])
    assert longest_row(rows, None, True) is None and longest_row(rows, rows.select([0]), False) == 9
    with pytest.raises(ConfigError, match="training rows of up to 64 tokens"):
        check_training_length(SimpleNamespace(max_position_embeddings=40), 64, longest_row(rows, None, True))


def test_rows_over_counts_the_rows_tokenized_here_that_max_length_cuts():
    """What SFT's note and its `rows_over_max_length` metric count: rows strictly longer than max_length (TRL keeps a
    row of exactly max_length whole); None for rows TRL tokenizes itself, which are not counted here."""
    from datasets import Dataset

    from stages.sft import rows_over

    ds = Dataset.from_dict({"input_ids": [[1] * 3, [1] * 4, [1] * 5], "assistant_masks": [[1] * 3, [1] * 4, [1] * 5]})
    assert (rows_over(ds, 4), rows_over(ds, 3), rows_over(ds, 5), rows_over(ds, None)) == (1, 2, 0, 0)
    assert rows_over(Dataset.from_dict({"text": ["a b"]}), 4) is None


def test_an_interrupted_run_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(
        tiny_models, runs_dir, monkeypatch, capsys):
    """resume == no resume: SFT killed at step 7, after its step-3 and step-6 checkpoints, and run again with the same
    command trains steps 7-10 only, from the newest checkpoint, and ends with the uninterrupted run's adapter and loss
    curve; its checkpoints are gone once it has finished. Its tokens/s counts only this launch's tokens (steps 7-10)
    over this launch's seconds (a clock that ticks one second a step). Another command line after a crash starts over,
    with a note, after deleting the other run's checkpoints, and ends as a fresh run does."""
    from types import SimpleNamespace

    import trl
    from transformers import TrainerCallback

    import stages.sft

    steps_run, crash_at, tokens_by_step = [], [], {}

    class Watch(TrainerCallback):
        def on_step_end(self, train_args, state, control, **kwargs):
            steps_run.append(state.global_step)
            tokens_by_step[state.global_step] = state.num_input_tokens_seen  # the whole run's count, as of this step
            if state.global_step in crash_at:
                raise RuntimeError(f"killed at step {state.global_step}")

    class WatchedTrainer(trl.SFTTrainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.add_callback(Watch())

    monkeypatch.setattr(trl, "SFTTrainer", WatchedTrainer)
    monkeypatch.setattr(stages.sft, "time", SimpleNamespace(time=lambda: float(len(steps_run))))

    def run(name, *extra, crash=None):
        steps_run.clear()
        crash_at[:] = [crash] if crash else []
        argv = tiny_args(tiny_models["llama"], runs_dir, name, "--save_strategy", "steps", "--save_steps", "3",
                         "--max_steps", "10", *extra)
        if crash:
            with pytest.raises(RuntimeError, match=f"killed at step {crash}"):
                main(*parse_args(argv))
            assert not (runs_dir / name / "sft" / "manifest.json").exists()
            return None
        return main(*parse_args(argv))

    def adapter(name):
        return load_file(runs_dir / name / "sft" / "adapter" / "adapter_model.safetensors")

    whole = run("whole")
    whole_tokens = dict(tokens_by_step)
    trainer_dir = runs_dir / "cut" / "sft" / "trainer"
    run("cut", crash=7)
    assert [p.name for p in sorted(trainer_dir.glob("checkpoint-*"))] == ["checkpoint-3", "checkpoint-6"]
    capsys.readouterr()
    resumed = run("cut")
    assert f"note: resuming from {trainer_dir / 'checkpoint-6'}" in capsys.readouterr().err
    assert steps_run == [7, 8, 9, 10] and resumed["resumed_from_step"] == 6 and whole["resumed_from_step"] is None
    assert resumed["loss_curve"] == whole["loss_curve"] and resumed["steps"] == whole["steps"] == 10
    assert (whole["train_time_s"], resumed["train_time_s"]) == (10.0, 4.0)
    assert whole["tokens_per_s"] == round(whole_tokens[10] / 10, 1)
    assert resumed["tokens_per_s"] == round((whole_tokens[10] - whole_tokens[6]) / 4, 1) != round(whole_tokens[10] / 4, 1)
    # the mean over all 10 steps, not over the 4 trained after the resume (transformers' training_loss)
    assert resumed["train_loss"] == whole["train_loss"]  # the same losses summed in the same order: equal
    a, b = adapter("whole"), adapter("cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(trainer_dir.glob("checkpoint-*")) and not (trainer_dir / "resume_key.json").exists()

    other_dir = runs_dir / "other" / "sft" / "trainer"
    run("other", crash=7)  # checkpoints 3 and 6 at the config's learning rate
    capsys.readouterr()
    run("other", "--learning_rate", "1e-2", crash=5)  # another learning rate starts over (and is killed too)
    assert "starting over" in capsys.readouterr().err and steps_run == [1, 2, 3, 4, 5]
    # the first run's step-6 checkpoint is gone: resuming from it would train on from another learning rate's weights
    assert [p.name for p in other_dir.glob("checkpoint-*")] == ["checkpoint-3"]
    other = run("other", "--learning_rate", "1e-2")
    assert other["resumed_from_step"] == 3 and steps_run == [4, 5, 6, 7, 8, 9, 10]
    assert other["loss_curve"] == run("fresh", "--learning_rate", "1e-2")["loss_curve"]


@pytest.mark.parametrize("steps", [3, 1])
def test_a_run_shorter_than_logging_steps_still_logs_its_loss(steps, tiny_models, runs_dir):
    """max_steps 3 (or 1, a smoke test's) with logging_steps 10 logged no loss, and the summary's first and last logged
    loss were None: the stage logs at the last step of such a run instead."""
    metrics = main(*parse_args(tiny_args(tiny_models["llama"], runs_dir, "short", "--max_steps", str(steps),
                                         "--logging_steps", "10")))
    assert len(metrics["loss_curve"]) == 1 and metrics["steps"] == steps
    assert metrics["first_logged_loss"] == metrics["last_logged_loss"] == metrics["loss_curve"][0]
    config = json.loads((runs_dir / "short" / "sft" / "config.json").read_text())
    assert config["train"]["logging_steps"] == steps


def test_data_openings_fit_the_positions_to_the_last_one_and_the_mixture_is_drawn_with_the_seed(tiny_models):
    """An opening fits when it and sample_max_new_tokens take the base's positions exactly (check_context's own rule:
    more than the limit is refused), so it is sampled, and a longer one is passed over. The mixture's rows are the
    ones load_mixture draws with the run's seed (another seed, other rows)."""
    from types import SimpleNamespace

    from datasets import Dataset

    from pipeline.data import load_mixture
    from pipeline.generation import encode_prompts
    from pipeline.models import load_tokenizer, profile_from
    from stages.sft import SFTArgs, load_data, sample_prompts_that_fit

    tokenizer = load_tokenizer(profile_from(tiny_models["llama"]))
    rows = [{"messages": [{"role": "user", "content": "word " * n}, {"role": "assistant", "content": "ok"}]}
            for n in (1, 3, 6, 9)]
    lengths = [len(encode_prompts(tokenizer, [r["messages"][:1]])[0]) for r in rows]
    assert lengths == sorted(set(lengths))
    args = SFTArgs(eval_fraction=0.0, sample_max_new_tokens=8)
    args.sample_prompts = []  # your data's openings
    base = SimpleNamespace(max_position_embeddings=lengths[1] + 8)
    conversations, prompts = sample_prompts_that_fit(args, Dataset.from_list(rows), tokenizer, base, 42)
    assert conversations == [r["messages"][:1] for r in rows[:2]] and [len(p) for p in prompts] == lengths[:2]

    mixture = SFTArgs(dataset_mixture={"data/sft/self_instruct.jsonl": 6})
    drawn = lambda seed: [r["messages"] for r in load_data(mixture, seed)[0]]  # noqa: E731
    assert drawn(7) == [r["messages"] for r in load_mixture([{"path": "data/sft/self_instruct.jsonl", "max_rows": 6}], 7)]
    assert drawn(7) != drawn(0)
