"""DPO stage: the real main() on configs/dpo.yaml with tiny overrides, four architectures, two processes.

The preference is the reward-model tests' synthetic one (tests/test_rm.py): the chosen reply has "banana" where the
rejected one has "window". The SFT adapter is random and non-zero, so a reference that is the raw base instead of the
SFT policy, or a saved adapter that is not the trained policy, shows up as different log-probs.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.lora_combine import combine_loras, require_combinable, save_lora
from pipeline.models import load_base, load_tokenizer, lora_config, profile_from, save_fingerprint
from pipeline.run import StageRun
from stages.dpo import check_reload, completion_logps, main, parse_args, preference_args
from tests.conftest import ARCHS, REPO, run_module, run_python, yaml_with
from tests.test_rm import fake_sft, marker_rows, one_and_two_processes_over_an_epochs_end, write_jsonl

LN2 = math.log(2)  # the DPO loss of every pair at the start: DPO's fresh LoRA is zero, so pi = pi_ref


def dpo_args(profile, runs_dir, run, *extra):
    return ["--config", str(REPO / "configs/dpo.yaml"), "--model_config", str(profile), "--runs_dir", str(runs_dir),
            "--run", run, "--lora_r", "8", "--lora_alpha", "16", "--num_train_epochs", "2", "--learning_rate", "1e-2",
            "--per_device_train_batch_size", "8",  # prompts (configs/dpo.yaml batches by prompt): one pair each here
            "--warmup_steps", "0", "--lr_scheduler_type", "constant", "--logging_steps", "4",
            "--per_device_eval_batch_size", "32", *extra]


@pytest.fixture(scope="module")
def marker_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_prefs")
    return {"conversational": write_jsonl(root / "marker.jsonl", marker_rows(160)),
            "plain": write_jsonl(root / "marker_plain.jsonl", marker_rows(160, plain=True))}


@pytest.fixture(scope="module", params=ARCHS)
def trained(request, tiny_models, marker_data, tmp_path_factory):
    """One real DPO run per architecture (GPT-NeoX on the plain-text implicit-prompt format)."""
    arch, runs_dir = request.param, tmp_path_factory.mktemp(f"dpo_runs_{request.param}")
    fake_sft(tiny_models[arch], runs_dir, "t")
    data = marker_data["plain" if arch == "gpt_neox" else "conversational"]
    metrics = main(*parse_args(dpo_args(tiny_models[arch], runs_dir, "t", "--dataset_name", str(data))))
    return arch, runs_dir / "t", metrics


def test_learns_marker_preference(trained):
    arch, run_dir, m = trained
    assert m["eval_pairs"] == 32 and m["train_pairs"] == 128 and m["world_size"] == 1
    assert m["eval_accuracy"] >= 0.9, m  # held out by prompt; an untrained policy scores 0 (every reward is 0)
    assert m["eval_mean_margin"] > 0 and m["eval_loss"] < LN2 - 0.1
    assert m["loss_curve"][-1] < m["loss_curve"][0] and m["train_accuracy_curve"][-1] > m["train_accuracy_curve"][0]
    assert m["steps"] == 32 and len(m["loss_curve"]) == len(m["train_margin_curve"]) == 32 // 4  # TRL's logs, every 4 steps
    # TRL's own held-out numbers (one batch of 32 pairs: its batch mean is the mean over pairs) equal ours per pair
    assert m["trl_eval"]["rewards/accuracies"] == m["eval_accuracy"]
    assert abs(m["trl_eval"]["rewards/margins"] - m["eval_mean_margin"]) <= 2e-4
    assert abs(m["trl_eval"]["loss"] - m["eval_loss"]) <= 2e-4
    assert m["reload_check"]["checked"] and m["reload_check"]["max_abs_logp_diff"] <= 1e-3
    manifest = json.loads((run_dir / "dpo" / "manifest.json").read_text())
    assert manifest["outputs"]["adapter"] == str(run_dir / "dpo" / "adapter")
    assert manifest["upstream"]["sft"]["outputs"]["adapter"] == str(run_dir / "sft" / "adapter")
    assert manifest["config"]["train"]["beta"] == 0.2 and manifest["metrics"]["eval_accuracy"] == m["eval_accuracy"]
    adapter = run_dir / "dpo" / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    sft_cfg = json.loads((run_dir / "sft" / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 + 8 and cfg["lora_alpha"] == 12 and cfg["base_model_name_or_path"] == sft_cfg["base_model_name_or_path"]
    assert set(cfg["target_modules"]) == set(sft_cfg["target_modules"]) and cfg["task_type"] == "CAUSAL_LM"
    assert (adapter / "tokenizer_config.json").is_file() and (adapter / "pipeline_base.json").is_file()
    assert len((run_dir / "dpo" / "eval_pairs.jsonl").read_text().splitlines()) == 32


STOCK_RELOAD = r"""
import json, sys, torch
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

dpo_dir, sft_dir, pairs_file, beta = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
tok = AutoTokenizer.from_pretrained(dpo_dir)
policy = AutoPeftModelForCausalLM.from_pretrained(dpo_dir).eval()
base = json.load(open(sft_dir + "/adapter_config.json"))["base_model_name_or_path"]
reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), sft_dir).eval()

def ids(prompt, reply):  # prompt and prompt + reply as token ids; the reply starts where they first differ
    if isinstance(prompt, str):
        reply = reply if reply.endswith(tok.eos_token) else reply + tok.eos_token
        p, full = tok(prompt)["input_ids"], tok(prompt + reply)["input_ids"]
    else:
        p = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        full = tok.apply_chat_template(prompt + reply, tokenize=True, return_dict=True)["input_ids"]
    n = next((i for i, (a, b) in enumerate(zip(p, full)) if a != b), min(len(p), len(full)))
    return full, n

# The Qwen2 fixture's tokenizer class adds <|endoftext|> (id 512) beyond the model's 512 embeddings, so
# AutoPeftModelForCausalLM grows the embeddings and LM head by one random row; no text uses that id: score over the
# base's own vocabulary.
vocab = AutoConfig.from_pretrained(base).vocab_size

@torch.no_grad()
def logp(model, full, n):
    logits = model(input_ids=torch.tensor([full])).logits[0, :-1, :vocab].float()
    token = logits.log_softmax(-1).gather(-1, torch.tensor(full[1:]).unsqueeze(-1)).squeeze(-1)
    return token[n - 1:].sum().item()

out = []
for line in open(pairs_file):
    pair = json.loads(line)
    rewards = [beta * (logp(policy, *ids(pair["prompt"], pair[k])) - logp(reference, *ids(pair["prompt"], pair[k])))
               for k in ("chosen", "rejected")]
    out.append(rewards)
print(json.dumps(out))
"""


def test_adapter_loads_with_stock_peft_on_raw_base(trained, tmp_path):
    """From another cwd, stock peft only: the DPO adapter on the raw base as the policy and the SFT adapter on the raw
    base as the reference give, pair by pair, the implicit rewards the stage recorded from its one merged model."""
    arch, run_dir, m = trained
    script = tmp_path / "reload.py"
    script.write_text(STOCK_RELOAD)
    beta = json.loads((run_dir / "dpo" / "manifest.json").read_text())["config"]["train"]["beta"]  # the one it trained with
    res = subprocess.run([sys.executable, str(script), str(run_dir / "dpo" / "adapter"), str(run_dir / "sft" / "adapter"),
                          str(run_dir / "dpo" / "eval_pairs.jsonl"), str(beta)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    stock = torch.tensor(json.loads(res.stdout.strip().splitlines()[-1]))
    recorded = torch.tensor([[p["reward_chosen"], p["reward_rejected"]]
                             for p in map(json.loads, open(run_dir / "dpo" / "eval_pairs.jsonl"))])
    assert recorded.abs().max() > 0.1  # the policy moved away from its reference
    torch.testing.assert_close(stock, recorded, atol=1e-4, rtol=0)


def test_reload_check_fails_when_the_saved_adapter_is_not_the_policy(trained, tiny_models, tiny_models_bf16):
    """The stage's last check: the saved adapter's log-probs must be the trained policy's (float32), else it fails."""
    from datasets import Dataset
    from peft import PeftModel
    arch, run_dir, _ = trained
    adapter = run_dir / "dpo" / "adapter"
    gen = torch.Generator().manual_seed(0)
    rows = [{"prompt_ids": torch.randint(3, 400, (5 + i,), generator=gen).tolist(),
             "chosen_ids": torch.randint(3, 400, (4,), generator=gen).tolist(),
             "rejected_ids": torch.randint(3, 400, (6,), generator=gen).tolist()} for i in range(6)]
    ds = Dataset.from_list(rows)
    for profiles, dtype in ((tiny_models, "float32"), (tiny_models_bf16, "bfloat16")):
        prof = profile_from(str(profiles[arch]))
        tok = load_tokenizer(prof)
        chosen, rejected = completion_logps(PeftModel.from_pretrained(load_base(prof, tok), str(adapter)), ds,
                                            tok.pad_token_id, 4)
        ok = check_reload(adapter, prof, tok, ds, 4, chosen, rejected)
        assert ok["max_abs_logp_diff"] <= 1e-4 and ok["pairs"] == 6 and ok["checked"] == (dtype == "float32")
        off = [c + 0.01 for c in chosen]  # a policy 0.01 nats away from the saved one
        if dtype == "float32":
            with pytest.raises(RuntimeError, match="does not reproduce the trained policy"):
                check_reload(adapter, prof, tok, ds, 4, off, rejected)
            with pytest.raises(RuntimeError, match="does not reproduce the trained policy"):  # the rejected replies too
                check_reload(adapter, prof, tok, ds, 4, chosen, [r + 0.01 for r in rejected])
        else:  # bf16 rounds the merged SFT weights: reported, not enforced
            assert check_reload(adapter, prof, tok, ds, 4, off, rejected)["max_abs_logp_diff"] >= 0.009


def random_lora(model, targets, r, alpha, seed, **extra):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=alpha, target_modules=targets,
                                             init_lora_weights=False, **extra))
    with torch.no_grad():  # random A and B, B scaled to a trained adapter's size (peft's random B moves logits by ~10)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(0.1)
    return model


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype,rslora", [(torch.float32, False), (torch.float64, False), (torch.float64, True)],
                         ids=["fp32", "fp64", "fp64-rslora"])
def test_combined_adapter_equals_sft_merged_plus_dpo_adapter(arch, dtype, rslora, tiny_models, tmp_path):
    """One LoRA of rank r_sft + r_dpo on the raw base == the DPO LoRA on the base with the SFT LoRA merged in.

    float64 shows the algebra is exact (to 1e-10). float32 differs only as much as merging the SFT adapter alone does:
    up to ~2e-5 on logits whose largest is ~7 (1e-6 relative to the logits' size), so there atol is 1e-5 x that size."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    prof = profile_from(str(tiny_models[arch]))
    tok, targets = load_tokenizer(prof), list(prof.lora_target_modules)

    def raw_base():
        return AutoModelForCausalLM.from_pretrained(prof.name_or_path, dtype=dtype)

    sft = random_lora(raw_base(), targets, r=4, alpha=8, seed=1, use_rslora=rslora)
    sft.save_pretrained(tmp_path / "sft")
    merged = PeftModel.from_pretrained(raw_base(), str(tmp_path / "sft")).merge_and_unload()
    dpo = random_lora(merged, targets, r=3, alpha=5, seed=2).eval()  # other rank and scaling than the SFT's
    sft_cfg = json.loads((tmp_path / "sft" / "adapter_config.json").read_text())
    state, cfg = combine_loras(load_file(str(tmp_path / "sft" / "adapter_model.safetensors")), sft_cfg,
                               get_peft_model_state_dict(dpo), dpo.peft_config["default"].to_dict())
    save_lora(tmp_path / "combined", state, cfg, prof.name_or_path)
    combined = PeftModel.from_pretrained(raw_base(), str(tmp_path / "combined")).eval()
    assert combined.peft_config["default"].r == 7 and combined.peft_config["default"].lora_alpha == 7

    ids = torch.randint(0, len(tok), (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = dpo(input_ids=ids).logits, combined(input_ids=ids).logits
        with dpo.disable_adapter():
            sft_only = dpo(input_ids=ids).logits
    assert got.dtype == dtype and (expected - sft_only).abs().max() > 0.1  # the DPO LoRA moves the logits: teeth
    scale = expected.abs().max().item()  # float32 rounding of the merged weights is relative to the logits' size
    torch.testing.assert_close(got, expected, atol=(1e-5 * scale if dtype == torch.float32 else 1e-10), rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merged_sft_policy_is_peft_merge_and_unload_to_the_bit(arch, dtype, tiny_models, tmp_path):
    """merge_into_base, which gives DPO its SFT policy and reference (the sharded path needs it), is peft's own
    merge_and_unload: the same weights to the bit, in bf16 too, where peft adds the fp32 update and rounds once."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipeline.lora_combine import merge_into_base

    prof = profile_from(str(tiny_models[arch]))

    def raw_base():
        return AutoModelForCausalLM.from_pretrained(prof.name_or_path, dtype=dtype)

    random_lora(raw_base(), list(prof.lora_target_modules), r=4, alpha=8, seed=1).save_pretrained(tmp_path / "sft")
    ours = merge_into_base(PeftModel.from_pretrained(raw_base(), str(tmp_path / "sft"))).state_dict()
    peft_merged = PeftModel.from_pretrained(raw_base(), str(tmp_path / "sft")).merge_and_unload().state_dict()
    raw = raw_base().state_dict()
    assert ours.keys() == peft_merged.keys() == raw.keys()
    moved = [k for k in raw if not torch.equal(peft_merged[k], raw[k])]
    assert moved and all(ours[k].dtype == dtype for k in moved)  # the SFT update is in: teeth
    assert [k for k in ours if not torch.equal(ours[k], peft_merged[k])] == []


@pytest.mark.slow
def test_two_sharded_ranks_merge_the_sft_policy_as_peft_merges_the_whole_base(tiny_models_bf16, tmp_path):
    """The same rule where DPO needs merge_into_base: a bf16 base sharded over two ranks, each adding its rows of the
    update, gathers to peft's merge_and_unload of the whole base, to the bit."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    prof = profile_from(str(tiny_models_bf16["llama"]))

    def raw_base():
        return AutoModelForCausalLM.from_pretrained(prof.name_or_path, dtype=torch.bfloat16)

    random_lora(raw_base(), list(prof.lora_target_modules), r=4, alpha=8, seed=1).save_pretrained(tmp_path / "sft")
    res = run_module("tests.merge_sharded_check", [str(tiny_models_bf16["llama"]), str(tmp_path / "sft"),
                                                   str(tmp_path / "merged.pt")], fsdp=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.load(tmp_path / "merged.pt")
    assert got["world"] == 2 and got["sharded"]
    expected = PeftModel.from_pretrained(raw_base(), str(tmp_path / "sft")).merge_and_unload().state_dict()
    raw = raw_base().state_dict()
    assert got["weights"].keys() == expected.keys()
    assert any(not torch.equal(expected[k], raw[k]) for k in raw)  # the SFT update is in: teeth
    assert [k for k in expected if not torch.equal(got["weights"][k], expected[k])] == []


def test_uncombinable_sft_adapters_are_refused(tiny_models, marker_data, tmp_path):
    """SFT on other target modules, or not a plain LoRA: one ConfigError, before the run folder is touched."""
    from peft import LoraConfig, get_peft_model

    prof = profile_from(str(tiny_models["llama"]))
    tok = load_tokenizer(prof)
    runs_dir = tmp_path / "runs"
    stage = StageRun("sft", "t", str(runs_dir))
    stage.prepare({})
    model = get_peft_model(load_base(prof, tok), LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(stage.dir / "adapter")
    save_fingerprint(stage.dir / "adapter", model.config, prof.name_or_path)
    stage.finish({"adapter": stage.dir / "adapter"}, {}, {})
    with pytest.raises(ConfigError, match=r"targets \['q_proj', 'v_proj'\].*same target modules"):
        main(*parse_args(dpo_args(tiny_models["llama"], runs_dir, "t", "--dataset_name", str(marker_data["conversational"]))))
    assert not (runs_dir / "t" / "dpo").exists()

    dora = get_peft_model(load_base(prof, tok), lora_config(prof, 4, 8, 0.0, use_dora=True))
    dora.save_pretrained(tmp_path / "dora")
    with pytest.raises(ConfigError, match="not a plain LoRA"):
        require_combinable(tmp_path / "dora", list(prof.lora_target_modules), what="SFT")
    require_combinable(runs_dir / "t" / "sft" / "adapter", ["q_proj", "v_proj"], what="SFT")  # its own targets: fine


def test_a_base_with_its_own_code(custom_code_model, tmp_path):
    """The profile's trust_remote_code reaches the SFT adapter's check against the base's config (it raised "contains
    custom code" without it)."""
    runs_dir = tmp_path / "runs"
    fake_sft(custom_code_model, runs_dir, "t")
    data = write_jsonl(tmp_path / "marker.jsonl", marker_rows(40))
    m = main(*parse_args(dpo_args(custom_code_model, runs_dir, "t", "--dataset_name", str(data), "--num_train_epochs", "1")))
    assert m["eval_pairs"] == 8 and m["train_pairs"] == 32


def test_bad_input_fails_cleanly(tiny_models, marker_data, tmp_path):
    runs_dir = tmp_path / "runs"
    llama = tiny_models["llama"]
    # 1. no SFT stage in this run
    with pytest.raises(ConfigError, match="needs the sft stage.*make sft"):
        main(*parse_args(dpo_args(llama, runs_dir, "t", "--dataset_name", str(marker_data["conversational"]))))
    assert not runs_dir.exists()
    # 2. an empty preference file: one `error:` line and exit code 2 (the command line as `make dpo` runs it)
    fake_sft(llama, runs_dir, "t")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    res = run_python("stages.dpo", dpo_args(llama, runs_dir, "t", "--dataset_name", str(empty)), timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "empty" in last and str(empty) in last and "Traceback" not in res.stderr
    # 3. a 4-bit base cannot hold the merged SFT adapter exactly
    four_bit = tmp_path / "llama4bit.yaml"
    four_bit.write_text(yaml_with(llama.read_text(), "load_in_4bit: true\n"))
    with pytest.raises(ConfigError, match="4-bit base cannot hold"):
        main(*parse_args(dpo_args(four_bit, runs_dir, "t", "--dataset_name", str(marker_data["conversational"]))))
    # 4. an FSDP launch of FSDP1: the pipeline shards with FSDP2 only
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACCELERATE_USE_FSDP", "true")
        mp.setenv("FSDP_VERSION", "1")
        with pytest.raises(ConfigError, match="FSDP version 1.*fsdp_version: 2"):
            main(*parse_args(dpo_args(llama, runs_dir, "t", "--dataset_name", str(marker_data["conversational"]))))
    assert sorted(p.name for p in (runs_dir / "t").iterdir()) == ["sft"]


@pytest.mark.parametrize("fmt", ["conversational", "plain"])
def test_token_ids_are_trls_own_on_pairs_that_fit(fmt, tiny_models, marker_data, tmp_path):
    """DPO trains on the reward model's token ids (as_token_ids) instead of letting TRL tokenize the text again; on
    pairs that fit max_length these are exactly the ids TRL's own preparation makes, prompt split included."""
    from types import SimpleNamespace

    from datasets import Dataset
    from trl import DPOTrainer

    from stages.dpo import as_token_ids
    from stages.rm_data import prepare_data

    tok = load_tokenizer(profile_from(str(tiny_models["llama"])))
    train_cfg, args, _ = parse_args(dpo_args(tiny_models["llama"], tmp_path, "t", "--dataset_name", str(marker_data[fmt])))
    train, held, _, _ = prepare_data(preference_args(args), train_cfg, StageRun("dpo", "t", str(tmp_path)), tok)
    rows = train + held
    ours = as_token_ids(rows)
    text = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    theirs = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tok), text, tok, SimpleNamespace(
        dataset_num_proc=None, max_length=train_cfg.max_length, truncation_mode="keep_start"), "marker")
    assert len(theirs) == len(ours) == 160
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert ours[key] == theirs[key], key


def test_a_pairs_length_for_grouping_is_its_longer_sequence():
    """as_token_ids by hand: the prompt is the first reply_start ids, each reply the rest, and `length` (what
    configs/dpo.yaml's group_by_length batches by) the longer of the two whole sequences, the width the collator pads
    the pair to. Mutant: the shorter one, grouping a long pair with short ones."""
    from stages.dpo import as_token_ids

    rows = [{"chosen_ids": [1, 5, 6, 7, 8, 2], "rejected_ids": [1, 5, 6, 9, 2], "reply_start": 3},
            {"chosen_ids": [1, 4, 2], "rejected_ids": [1, 4, 9, 9, 9, 9, 9, 2], "reply_start": 2}]
    assert as_token_ids(rows).to_list() == [
        {"prompt_ids": [1, 5, 6], "chosen_ids": [7, 8, 2], "rejected_ids": [9, 2], "length": 6},
        {"prompt_ids": [1, 4], "chosen_ids": [2], "rejected_ids": [9, 9, 9, 9, 9, 2], "length": 8}]


def test_pairs_over_max_length_are_cut_as_the_reward_models_and_formats_mix(tiny_models, marker_data, tmp_path):
    """Pairs whose prompt alone passes max_length, which TRL's own preparation would silently drop (and then the
    stage stopped after training, or trained on fewer pairs than it reported), are kept, cut as the reward model cuts
    them; conversational and plain-text sources train together. Every pair counted is trained on: 2 epochs of
    ceil(train_pairs / 8) steps."""
    runs_dir = tmp_path / "runs"
    fake_sft(tiny_models["llama"], runs_dir, "t")
    long = [{**r, "prompt": [{"role": "user", "content": r["prompt"][0]["content"] + " and so on" * 60}]}
            for r in marker_rows(40, seed=5)]
    plain = write_jsonl(tmp_path / "plain.jsonl", marker_rows(40, seed=3, plain=True))
    mixture = json.dumps({str(marker_data["conversational"]): {}, str(write_jsonl(tmp_path / "long.jsonl", long)): {},
                          str(plain): {}})
    m = main(*parse_args(dpo_args(tiny_models["llama"], runs_dir, "t", "--dataset_mixture", mixture,
                                  "--per_device_train_batch_size", "8")))
    assert m["train_pairs"] + m["eval_pairs"] == m["pairs_read"] == 240
    assert m["truncated_prompts"] == 40 and m["dropped_no_room"] == 0
    assert m["steps"] == 2 * math.ceil(m["train_pairs"] / 8)
    assert m["reload_check"]["checked"] and len((runs_dir / "t" / "dpo" / "eval_pairs.jsonl").read_text().splitlines()) == m["eval_pairs"]


@pytest.mark.parametrize("recipe", ["configs", "configs/recipes/assistant"])
def test_default_data_is_the_reward_models(recipe):
    """An empty dataset_mixture in a recipe's dpo.yaml means that recipe's rm.yaml's; the cut and split settings match,
    so both learn from the same token ids and hold out the same prompts."""
    from stages.rm import parse_args as rm_parse_args

    train_cfg, args, _ = parse_args(["--config", str(REPO / recipe / "dpo.yaml")])
    rm_cfg, rm, _ = rm_parse_args(["--config", str(REPO / recipe / "rm.yaml")])
    assert args.dataset_mixture == {} and preference_args(args).dataset_mixture == rm.dataset_mixture
    assert (args.eval_fraction, train_cfg.max_length, train_cfg.seed, preference_args(args).max_prompt_length) == (
        rm.eval_fraction, rm_cfg.max_length, rm_cfg.seed, rm.max_prompt_length)
    assert preference_args(args).margin_scale == 0.0
    _, args, _ = parse_args(["--config", str(REPO / recipe / "dpo.yaml"), "--eval_fraction", "0.1"])
    assert preference_args(args).eval_fraction == 0.1  # the split DPO is told to make is the one it makes
    own = json.dumps({"data/preferences/tulu.jsonl": {"weight": 1.0}})
    _, args, _ = parse_args(["--config", str(REPO / "configs/dpo.yaml"), "--dataset_mixture", own])
    assert preference_args(args).dataset_mixture == json.loads(own)


def test_rm_config_is_read_as_make_rm_reads_it(tiny_models, tmp_path):
    """DPO takes rm_config as `make rm` parses it: a variant holding base_config: and one key, read as plain YAML, gave
    no mixture ("no preference data"), and its max_prompt_length was never taken (DPO kept 64 prompt tokens)."""
    from pipeline.generation import common_prefix
    from stages.rm_data import prepare_data

    variant = tmp_path / "rm_variant.yaml"
    variant.write_text("base_config: configs/rm.yaml\nmax_length: 256\nmax_prompt_length: 40\n")
    _, args, _ = parse_args(["--config", str(REPO / "configs/dpo.yaml"), "--rm_config", str(variant)])
    assert preference_args(args).dataset_mixture == {"label-export": {"weight": 1.0}}  # configs/rm.yaml's
    # Pairs whose prompt and replies are each longer than max_length: each reply keeps max_length - 40 tokens (less a
    # BOS), the prompt the last 40 tokens before them, which is where the two sequences part.
    long = " ".join(["the cat sat on a mat"] * 30)
    rows = [{"prompt": [{"role": "user", "content": f"Number {i}. {long}"}],
             "chosen": [{"role": "assistant", "content": f"Banana {long}"}],
             "rejected": [{"role": "assistant", "content": f"Window {long}"}]} for i in range(5)]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    train_cfg, args, _ = parse_args(["--config", str(REPO / "configs/dpo.yaml"), "--rm_config", str(variant),
                                     "--dataset_name", str(data), "--max_length", "128"])
    tok = load_tokenizer(profile_from(str(tiny_models["llama"])))
    train_rows, eval_rows, _, _ = prepare_data(preference_args(args), train_cfg, None, tok)
    for r in train_rows + eval_rows:
        bos = int(r["chosen_ids"][0] == tok.bos_token_id)
        assert len(r["chosen_ids"]) == len(r["rejected_ids"]) == 128
        assert common_prefix(r["chosen_ids"], r["rejected_ids"]) == bos + 40


@pytest.mark.slow
def test_two_processes_on_the_runs_label_export_ddp_and_sharded_alike(tiny_models, tmp_path):
    """Two real gloo processes, on this run's label export (found through its manifest, as `make rm` finds it): as DDP,
    and on a base sharded by FSDP2 (configs/accelerate/fsdp_cpu2.yaml), where each rank holds half the base with the
    SFT update merged into its half. The two train the same policy: the same losses and adapter, to float rounding."""
    import datasets
    from safetensors.torch import load_file

    runs_dir = tmp_path / "runs"
    for launch in ("ddp", "fsdp"):
        fake_sft(tiny_models["qwen2"], runs_dir, launch)  # seeded: the same SFT adapter for both
        export = StageRun("label-export", launch, str(runs_dir))
        export.prepare({})
        rows = [dict(r, annotator="ann", strength="much", agreement=1.0, is_tie=False) for r in marker_rows(160, seed=1)]
        datasets.Dataset.from_list(rows).save_to_disk(str(export.dir / "dataset"))
        export.finish({"dataset": export.dir / "dataset"}, {}, {})
        mixture = json.dumps({"label-export": {"weight": 1.0}})
        res = run_module("stages.dpo", dpo_args(tiny_models["qwen2"], runs_dir, launch, "--dataset_mixture", mixture,
                                                "--per_device_train_batch_size", "4"),
                         timeout=500, **({"fsdp": True} if launch == "fsdp" else {"processes": 2}))
        assert res.returncode == 0, res.stderr[-4000:]
        manifest = json.loads((runs_dir / launch / "dpo" / "manifest.json").read_text())
        m = manifest["metrics"]
        assert m["world_size"] == 2 and m["steps"] == 2 * 128 // (2 * 4)  # 2 epochs of 128 pairs, 4 per process
        assert m["eval_accuracy"] >= 0.9 and m["reload_check"]["max_abs_logp_diff"] <= 1e-3, m
        assert set(m["pairs_by_source"]) == {"label-export"} and "label-export" in manifest["upstream"]
    ddp, fsdp = (json.loads((runs_dir / n / "dpo/manifest.json").read_text())["metrics"] for n in ("ddp", "fsdp"))
    assert ddp["sharding"]["engine"] == "none" and fsdp["sharding"]["engine"] == "fsdp2"
    # The reload check on the base sharded again (it may not fit whole on one device), checked in fp32 as under DDP
    assert (ddp["reload_check"]["sharded"], fsdp["reload_check"]["sharded"]) == (False, True)
    assert ddp["reload_check"]["checked"] and fsdp["reload_check"]["checked"]
    full = fsdp["sharding"]["base_numel_full"]
    assert sum(fsdp["sharding"]["base_numel_per_rank"]) == full and max(fsdp["sharding"]["base_numel_per_rank"]) < full
    # the same arithmetic on the same batches (as SFT's and the reward model's, tests/test_sharding.py): seen equal
    assert ddp["loss_curve"] == fsdp["loss_curve"]
    assert ddp["eval_accuracy"] == fsdp["eval_accuracy"] and ddp["eval_loss"] == pytest.approx(fsdp["eval_loss"], abs=1e-6)
    a, b = (load_file(runs_dir / n / "dpo/adapter/adapter_model.safetensors") for n in ("ddp", "fsdp"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)  # seen: 0.0


def test_a_label_export_that_appears_later_makes_dpo_out_of_date(tiny_models, marker_data, tmp_path):
    """DPO on a mixture that names the run's label export, before there is one: like the reward model, its manifest
    records that it would read it, so an export made afterwards reruns `make dpo` (it stayed "up to date")."""
    runs = tmp_path / "runs"
    fake_sft(tiny_models["llama"], runs, "t")
    mixture = json.dumps({"label-export": {"weight": 1.0}, str(marker_data["conversational"]): {"weight": 1.0}})
    main(*parse_args(dpo_args(tiny_models["llama"], runs, "t", "--dataset_mixture", mixture, "--num_train_epochs", "1")))
    manifest = json.loads((runs / "t" / "dpo" / "manifest.json").read_text())
    assert manifest["inputs"]["manifests"] == {"label-export": None, "sft": manifest["inputs"]["manifests"]["sft"]}


def test_combined_lora_by_hand_keeps_the_adapters_dtype():
    """One module, hand-sized: SFT r=1, alpha 2 (scaling 2); DPO r=2, alpha 1 with rsLoRA (scaling 1/sqrt 2). The
    combined A stacks the As, B holds the scaled Bs side by side, rank 3 at alpha 3 (scaling 1): in float32, the
    adapters' dtype (the float64 arithmetic is rounded once, not saved)."""
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    a1, b1 = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0], [4.0]])
    a2, b2 = torch.tensor([[5.0, 6.0], [7.0, 8.0]]), torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    sft_cfg = {"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["q_proj"]}
    dpo_cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 1, "use_rslora": True, "target_modules": ["q_proj"]}
    state, cfg = combine_loras({f"{key}.lora_A.weight": a1, f"{key}.lora_B.weight": b1}, sft_cfg,
                               {f"{key}.lora_A.weight": a2, f"{key}.lora_B.weight": b2}, dpo_cfg)
    s2 = 1 / math.sqrt(2)
    a, b = state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"]
    assert a.dtype == b.dtype == torch.float32 and sorted(state) == [f"{key}.lora_A.weight", f"{key}.lora_B.weight"]
    assert torch.equal(a, torch.tensor([[1.0, 2.0], [5.0, 6.0], [7.0, 8.0]]))
    assert torch.equal(b, torch.tensor([[6.0, s2, 2 * s2], [8.0, 3 * s2, 4 * s2]], dtype=torch.float64).float())
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (3, 3, False)
    x = torch.tensor([0.5, -1.0])  # the combined update is the sum of the two: 2 B1 A1 x + s2 B2 A2 x
    torch.testing.assert_close(b.double() @ (a.double() @ x.double()),
                               2 * b1.double() @ (a1.double() @ x.double()) + s2 * b2.double() @ (a2.double() @ x.double()))


@pytest.mark.parametrize("first,second", [(torch.float32, torch.float64), (torch.float64, torch.float32)],
                         ids=["sft-narrower", "dpo-narrower"])
def test_loras_of_two_dtypes_combine_in_the_wider_one(first, second):
    """An SFT adapter saved in one precision and DPO's in another: the combined LoRA is in the wider of the two, so
    neither adapter's matrices are rounded to the other's. Mutants: the first adapter's dtype kept, the second's."""
    a1, b1 = torch.tensor([[1.0, 1 / 3]], dtype=first), torch.tensor([[3.0], [1 / 7]], dtype=first)
    a2, b2 = torch.tensor([[1 / 3, 6.0]], dtype=second), torch.tensor([[1.0], [1 / 11]], dtype=second)
    config = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["q_proj"]}  # scaling 1: B as it is
    state, _ = combine_loras({"m.lora_A.weight": a1, "m.lora_B.weight": b1}, config,
                             {"m.lora_A.weight": a2, "m.lora_B.weight": b2}, config)
    a, b = state["m.lora_A.weight"], state["m.lora_B.weight"]
    assert a.dtype == b.dtype == torch.float64
    assert torch.equal(a, torch.cat([a1.double(), a2.double()], dim=0))
    assert torch.equal(b, torch.cat([b1.double(), b2.double()], dim=1))


def test_an_sft_lora_on_parameters_is_refused_by_its_config(tmp_path):
    """A LoRA that also targets parameters (target_parameters: an MoE's expert weights) saves those matrices under the
    same lora_A/lora_B names as a module's, so its weights file looks plain: its config alone says it is not, and it is
    refused before any training (DPO's own LoRA wraps modules only, and the two would not combine into one). Mutant:
    target_parameters left out of the refused extras."""
    from safetensors.torch import save_file

    key = "base_model.model.model.layers.0.self_attn.q_proj"
    config = {"peft_type": "LORA", "bias": "none", "target_modules": ["q_proj"],
              "target_parameters": ["mlp.experts.gate_up_proj"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file({f"{key}.lora_A.weight": torch.ones(1, 2), f"{key}.lora_B.weight": torch.ones(2, 1)},
              str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ConfigError, match=r"not a plain LoRA .*target_parameters"):
        require_combinable(tmp_path, ["q_proj"], what="SFT")


@pytest.mark.parametrize("change,message", [
    ({"bias": "lora_only"}, "not a plain LoRA"),
    ({"extra_weight": "base_model.model.model.embed_tokens.weight"}, "holds weights other than LoRA A/B matrices"),
    ({}, None),
], ids=["trained-bias", "saved-embeddings", "plain"])
def test_an_sft_adapter_with_a_trained_bias_or_other_weights_does_not_combine(change, message, tmp_path):
    """A LoRA that trained biases (bias: lora_only), or that was saved with other weights (save_embedding_layers: the
    embeddings), holds more than B A: combining its A and B alone would silently drop the rest."""
    from safetensors.torch import save_file

    key = "base_model.model.model.layers.0.self_attn.q_proj"
    config = {"peft_type": "LORA", "bias": change.get("bias", "none"), "target_modules": ["q_proj"]}
    weights = {f"{key}.lora_A.weight": torch.ones(1, 2), f"{key}.lora_B.weight": torch.ones(2, 1)}
    if "extra_weight" in change:
        weights[change["extra_weight"]] = torch.ones(3, 2)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file(weights, str(tmp_path / "adapter_model.safetensors"))
    if message is None:
        require_combinable(tmp_path, ["q_proj"], what="SFT")
    else:
        with pytest.raises(ConfigError, match=message):
            require_combinable(tmp_path, ["q_proj"], what="SFT")


def test_an_sft_adapter_targeting_a_regex_is_refused_naming_the_regex(tmp_path):
    """peft keeps a target_modules string as one regular expression (a list names modules): the refusal names the
    expression whole beside the profile's modules. Mutant: the string read as the set of its letters, and the error
    listed single characters."""
    import re

    from pipeline.lora_combine import target_set

    assert target_set({"target_modules": "(q_proj|v_proj)"}) == {"(q_proj|v_proj)"}
    assert target_set({"target_modules": ["q_proj", "v_proj"]}) == {"q_proj", "v_proj"}
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "target_modules": "(q_proj|v_proj)"}))
    with pytest.raises(ConfigError, match=re.escape("targets ['(q_proj|v_proj)'], the model profile ['q_proj', 'v_proj']")):
        require_combinable(tmp_path, ["q_proj", "v_proj"], what="SFT")


@pytest.mark.slow
def test_two_sharded_ranks_resume_an_interrupted_run_and_end_as_an_uninterrupted_one(tiny_models, marker_data, tmp_path):
    """resume == no resume on a base sharded by FSDP2 over two CPU ranks: killed after step 5 (tests/killed_stage.py),
    after its step-4 checkpoint, the same command resumes from step 4 and ends with the uninterrupted sharded run's
    policy, to the bit, and its loss curve."""
    from safetensors.torch import load_file

    runs_dir = tmp_path / "runs"

    def args(run):
        return dpo_args(tiny_models["llama"], runs_dir, run, "--dataset_name", str(marker_data["conversational"]),
                        "--max_steps", "8", "--save_strategy", "steps", "--save_steps", "4")

    for run in ("whole", "cut"):
        fake_sft(tiny_models["llama"], runs_dir, run)
    whole = run_module("stages.dpo", args("whole"), fsdp=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = run_module("tests.killed_stage", ["stages.dpo", "5", *args("cut")], fsdp=True, timeout=300)
    assert killed.returncode != 0 and "killed at step 5" in killed.stderr, killed.stderr[-3000:]
    trainer_dir = runs_dir / "cut" / "dpo" / "trainer"
    assert sorted(p.name for p in trainer_dir.glob("checkpoint-*")) == ["checkpoint-4"]
    resumed = run_module("stages.dpo", args("cut"), fsdp=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count(f"note: resuming from {trainer_dir / 'checkpoint-4'}") == 1
    m_whole, m_cut = (json.loads((runs_dir / n / "dpo/manifest.json").read_text())["metrics"] for n in ("whole", "cut"))
    assert m_whole["world_size"] == m_cut["world_size"] == 2
    assert m_whole["sharding"]["engine"] == m_cut["sharding"]["engine"] == "fsdp2"
    assert m_cut["resumed_from_step"] == 4 and m_whole["resumed_from_step"] is None
    assert m_cut["loss_curve"] == m_whole["loss_curve"] and m_cut["eval_accuracy"] == m_whole["eval_accuracy"]
    a, b = (load_file(runs_dir / n / "dpo/adapter/adapter_model.safetensors") for n in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_interrupted_run_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(
        tiny_models, marker_data, tmp_path, monkeypatch):
    """resume == no resume for DPO too: killed at step 5, after its step-4 checkpoint, the same command trains steps
    5-8 only and ends with the uninterrupted run's policy, loss curve and held-out figures."""
    from safetensors.torch import load_file
    from transformers.trainer_callback import CallbackHandler

    original, steps_run, kill = CallbackHandler.on_step_end, [], [False]

    def watched(self, train_args, state, control):
        steps_run.append(state.global_step)
        if kill[0] and state.global_step == 5:
            raise RuntimeError("killed at step 5")
        return original(self, train_args, state, control)

    monkeypatch.setattr(CallbackHandler, "on_step_end", watched)
    runs_dir, arch = tmp_path / "runs", "llama"
    extra = ("--dataset_name", str(marker_data["conversational"]), "--max_steps", "8", "--save_strategy", "steps",
             "--save_steps", "4")
    for run in ("whole", "cut"):
        fake_sft(tiny_models[arch], runs_dir, run)
    whole = main(*parse_args(dpo_args(tiny_models[arch], runs_dir, "whole", *extra)))
    kill[0] = True
    with pytest.raises(RuntimeError, match="killed at step 5"):
        main(*parse_args(dpo_args(tiny_models[arch], runs_dir, "cut", *extra)))
    kill[0], steps_run[:] = False, []
    cut = main(*parse_args(dpo_args(tiny_models[arch], runs_dir, "cut", *extra)))
    assert steps_run == [5, 6, 7, 8] and cut["resumed_from_step"] == 4 and whole["resumed_from_step"] is None
    for key in ("loss_curve", "eval_accuracy", "reward_mean", "trl_eval", "steps"):
        assert cut[key] == whole[key], key
    a, b = (load_file(runs_dir / run / "dpo" / "adapter" / "adapter_model.safetensors") for run in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((runs_dir / "cut" / "dpo" / "trainer").glob("checkpoint-*"))


def test_the_reload_check_under_the_launchs_mixed_precision(tiny_models, marker_data, tmp_path, monkeypatch):
    """Under `mixed_precision: bf16` (configs/accelerate/multi_gpu.yaml and fsdp.yaml) the trained policy's held-out
    log-probs come from bf16 autocast and the reload's from float32: they differ by bf16 rounding, which is reported,
    not enforced (as on a bf16 base), and the stage finishes."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    runs_dir = tmp_path / "runs"
    fake_sft(tiny_models["llama"], runs_dir, "t")
    metrics = main(*parse_args(dpo_args(tiny_models["llama"], runs_dir, "t", "--dataset_name",
                                        str(marker_data["conversational"]), "--max_steps", "4")))
    check = metrics["reload_check"]
    assert check["checked"] is False and check["dtype"] == "bfloat16 (mixed precision)", check


def test_rm_configs_prompt_cut_too_long_for_dpo_names_rm_config(tmp_path):
    """rm_config's max_prompt_length is checked against DPO's own max_length, and the error names rm_config: the
    reward model's loader said only "max_prompt_length 100 must be ... half of max_length (128)", a setting found in
    neither of the files the user gave."""
    variant = tmp_path / "rm_variant.yaml"
    variant.write_text("base_config: configs/rm.yaml\nmax_length: 512\nmax_prompt_length: 100\n")
    _, args, _ = parse_args(["--config", str(REPO / "configs/dpo.yaml"), "--rm_config", str(variant)])
    assert preference_args(args, 200).max_prompt_length == 100  # 100 <= 200 // 2
    with pytest.raises(ConfigError, match=rf"max_prompt_length 100 \(from rm_config {variant}\) .* DPO's max_length \(199\)"):
        preference_args(args, 199)


def test_loras_on_different_modules_do_not_combine():
    """DPO's policy is the SFT LoRA and its own combined into one: a second LoRA on more modules than the first would
    lose its extra modules without a word. One error naming them."""
    gen = torch.Generator().manual_seed(0)

    def lora(*modules):
        return {f"{m}.{ab}.weight": torch.randn(shape, generator=gen) for m in modules
                for ab, shape in (("lora_A", (2, 4)), ("lora_B", (4, 2)))}

    config = {"lora_alpha": 2, "r": 2}
    with pytest.raises(ConfigError, match=r"wrap different modules \(\['m2'\]"):
        combine_loras(lora("m1"), config, lora("m1", "m2"), config)
    state, _ = combine_loras(lora("m1", "m2"), config, lora("m1", "m2"), config)
    assert sorted(state) == ["m1.lora_A.weight", "m1.lora_B.weight", "m2.lora_A.weight", "m2.lora_B.weight"]


def one_by_8_and_two_by_4(tiny_models, runs_dir, common: list[str]):
    """Runs "one" (one process x 8 a batch) and "two" (two processes x 4) of the stage with the flags `common`:
    ((metrics of one, of two), (their processes)), both world sizes checked."""
    done = {}
    for run, batch, processes in (("one", "8", 1), ("two", "4", 2)):
        done[run] = run_module("stages.dpo", dpo_args(tiny_models["llama"], runs_dir, run, *common,
                                                      "--per_device_train_batch_size", batch),
                               processes=processes, timeout=400)
        assert done[run].returncode == 0, done[run].stderr[-3000:]
    m1, m2 = (json.loads((runs_dir / n / "dpo/manifest.json").read_text())["metrics"] for n in ("one", "two"))
    assert m1["world_size"] == 1 and m2["world_size"] == 2, m1
    return (m1, m2), (done["one"], done["two"])


@pytest.mark.slow
def test_two_processes_match_one_process_across_an_epochs_end(tiny_models, tmp_path):
    """TRL's pairwise batches, 1 x 8 pairs against 2 x 4: the same losses up to the epoch's last batch, which holds 4 of
    its own pairs.
    accelerate fills rank 1's last batch with 4 pairs from the epoch's start, which DPO trains on
    (stages/epoch_end.py): rank 1 says so, once."""
    runs_dir, common = one_and_two_processes_over_an_epochs_end(tiny_models, tmp_path)
    common += ["--batch_by_prompt", "false"]  # TRL's pairwise batches (batches by prompt: tests/test_dpo_groups.py)
    (m1, m2), (one, two) = one_by_8_and_two_by_4(tiny_models, runs_dir, common)
    assert len(m1["loss_curve"]) == len(m2["loss_curve"]) == 14, m1
    diffs = [abs(a - b) for a, b in zip(m1["loss_curve"], m2["loss_curve"])]
    assert max(diffs[:10]) < 1e-4 and m1["train_pairs"] == 84, (m1["loss_curve"], m2["loss_curve"])  # step 11: 4 pairs
    assert two.stderr.count("last batch of the epoch repeats 4 pairs") == 1, two.stderr[-3000:]
    assert "a multiple of 8 pairs" in two.stderr and "repeats" not in one.stderr
