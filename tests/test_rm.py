"""Reward model stage: the real main() on configs/rm.yaml with tiny overrides, four architectures, two processes.

The preference to learn is synthetic and unambiguous: the chosen reply contains the word "banana" where the rejected
one has "window", same prompt, same other words. A reward model that really trains scores >= 95% on held-out prompts;
one that does not (or whose head is lost on reload) sits near 50%.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.models import lora_config, load_base, load_tokenizer, profile_from, save_fingerprint
from pipeline.run import StageRun, manifest_digest
from stages.rm import RMArgs, main, parse_args, plan_steps
from stages.rm_scoring import check_reload
from stages.rm_data import encode_pair, load_pairs, prepare_data, reply_start, truncate_pair, weighted
from pipeline.adapters import SUM_DIVISOR, pool_in_forward, pool_scores, prompt_part, read_pooling, write_pooling
from tests.conftest import ARCHS, REPO, guarded_exit, run_module, run_python

WORDS = "the cat sat on a mat and ran to see her little friend in the big green garden by old tree".split()


def marker_rows(n: int, seed: int = 0, plain: bool = False) -> list[dict]:
    rng, rows = random.Random(seed), []
    for i in range(n):
        words, j = rng.sample(WORDS, 6), rng.randrange(1, 7)  # never first: " banana" is one token sequence
        prompt = f"Tell me about the {rng.choice(WORDS)}, number {i}."
        good, bad = (" ".join(words[:j] + [w] + words[j:]) for w in ("banana", "window"))
        if plain:  # implicit prompt, plain text: TRL's "standard preference" format
            rows.append({"chosen": f"{prompt} {good}", "rejected": f"{prompt} {bad}"})
        else:
            rows.append({"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": good}],
                         "rejected": [{"role": "assistant", "content": bad}]})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def fake_sft(profile, runs_dir, run: str):
    """A finished SFT stage as the real one records it: a stock PEFT causal-LM adapter + fingerprint + manifest."""
    from peft import get_peft_model

    prof = profile_from(str(profile))
    tok = load_tokenizer(prof)
    base = load_base(prof, tok)
    stage = StageRun("sft", run, str(runs_dir))
    stage.prepare({})
    torch.manual_seed(1)
    model = get_peft_model(base, lora_config(prof, r=4, alpha=8, dropout=0.0, init_lora_weights=False))
    adapter = stage.dir / "adapter"
    model.save_pretrained(adapter)
    tok.save_pretrained(adapter)
    save_fingerprint(adapter, base.config, prof.name_or_path)
    stage.finish({"adapter": adapter, "base_model": prof.name_or_path}, {}, {})


def rm_args(profile, runs_dir, run, *extra):
    return ["--config", str(REPO / "configs/rm.yaml"), "--model_config", str(profile), "--runs_dir", str(runs_dir),
            "--run", run, "--eval_fraction", "0.2", "--num_train_epochs", "4", "--per_device_train_batch_size", "8",
            "--learning_rate", "1e-2", "--warmup_steps", "0", "--lr_scheduler_type", "constant", "--logging_steps", "4",
            "--ensemble", "1", *extra]  # one reward model unless a test asks for more (configs/rm.yaml trains 3)


@pytest.fixture(scope="module")
def marker_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefs")
    return {"conversational": write_jsonl(root / "marker.jsonl", marker_rows(320)),
            "plain": write_jsonl(root / "marker_plain.jsonl", marker_rows(320, plain=True))}


@pytest.fixture(scope="module", params=ARCHS)
def trained(request, tiny_models, marker_data, tmp_path_factory):
    """One real RM run per architecture (GPT-NeoX on the plain-text implicit-prompt format, in pairwise batches)."""
    arch, runs_dir = request.param, tmp_path_factory.mktemp(f"runs_{request.param}")
    fake_sft(tiny_models[arch], runs_dir, "t")
    data = marker_data["plain" if arch == "gpt_neox" else "conversational"]
    pairwise = ["--batch_by_prompt", "false"] if arch == "gpt_neox" else []  # TRL's own batches (configs/rm.yaml: by prompt)
    metrics = main(*parse_args(rm_args(tiny_models[arch], runs_dir, "t", "--dataset_name", str(data), *pairwise)))
    return arch, runs_dir / "t" / "rm", metrics


def test_learns_marker_preference_and_reloads(trained):
    arch, stage, metrics = trained
    assert metrics["eval_accuracy"] >= 0.95, metrics  # held out by prompt: 64 pairs never trained on
    assert metrics["eval_pairs"] == 64 and metrics["train_pairs"] == 256
    assert metrics["eval_mean_margin"] > 0 and metrics["reward_std"] > 0
    assert metrics["loss_curve"][-1] < metrics["loss_curve"][0]
    # the fresh-process reload (stock AutoPeftModelForSequenceClassification) reproduced the held-out scores
    assert metrics["reload_check"]["eval_accuracy"] == metrics["eval_accuracy"]
    assert metrics["reload_check"]["max_abs_diff"] <= 1e-4
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["outputs"]["adapter"] == str(stage / "adapter") and manifest["upstream"]["sft"]["outputs"]["adapter"]
    for key in ("eval_accuracy", "eval_mean_margin", "reward_mean", "reward_std"):
        assert key in manifest["metrics"]
    adapter = json.loads((stage / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    assert (stage / "adapter" / "tokenizer_config.json").is_file() and (stage / "adapter" / "pipeline_base.json").is_file()
    eval_prompts = {json.dumps(json.loads(line)["prompt"]) for line in open(stage / "eval_pairs.jsonl")}
    assert len(eval_prompts) == 64


def test_heldout_metrics_and_weights_by_hand():
    """The held-out figures from made-up scores: a tie counts as wrong, equal lengths half for "longer wins", the
    reward statistics PPO normalises with are over every held-out reply (population std); a weight of 1.5 keeps
    every row once and a random half of them again."""
    import math

    from stages.rm_scoring import heldout_metrics

    rows = [{"source": "a", "full_lengths": (5, 3)}, {"source": "a", "full_lengths": (2, 2)},
            {"source": "b", "full_lengths": (1, 4)}, {"source": "b", "full_lengths": (3, 3)}]
    chosen, rejected = [2.0, 1.0, 0.5, 0.0], [0.0, 1.0, 1.5, -1.0]  # right, tie (wrong), wrong, right
    m = heldout_metrics(rows, chosen, rejected)
    assert m["eval_accuracy"] == 0.5 and m["eval_mean_margin"] == 0.5  # margins 2, 0, -1, 1
    loss = (-math.log(1 / (1 + math.exp(-2))) + math.log(2) - math.log(1 / (1 + math.exp(1))) - math.log(1 / (1 + math.exp(-1)))) / 4
    assert m["eval_loss"] == pytest.approx(loss, abs=1e-4)
    # every reply: 2, 1, .5, 0, 0, 1, 1.5, -1; mean 5 / 8, squared deviations sum to 6.375
    assert m["reward_mean"] == 0.625 and m["reward_std"] == pytest.approx(math.sqrt(6.375 / 8), abs=1e-4)
    assert m["eval_longer_wins_accuracy"] == 0.5  # right, tie, wrong, tie
    assert m["eval_by_source"]["a"]["accuracy"] == 0.5 and m["eval_by_source"]["a"]["longer_wins_accuracy"] == 0.75
    assert m["eval_by_source"]["b"]["accuracy"] == 0.5 and m["eval_by_source"]["b"]["longer_wins_accuracy"] == 0.25
    # each source's pairs, chosen against their own rejected: a's margins 2, 0; b's -1, 1 (b's chosen against a's
    # rejected would give 0.5, -1)
    assert m["eval_by_source"]["a"]["mean_margin"] == 1.0 and m["eval_by_source"]["b"]["mean_margin"] == 0.0
    # the 95% interval is of the pairs scored right (Wilson, z = 1.96): 3 of 4 -> centre (0.75 + 0.4802) / 1.9604 =
    # 0.6275, half-width 1.96 * sqrt(0.046875 + 0.060025) / 1.9604 = 0.3269, so [0.301, 0.954] (wrong count: [0.046, 0.699])
    m = heldout_metrics([{"source": "a", "full_lengths": (1, 1)}] * 4, [1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0])
    assert m["eval_accuracy"] == 0.75 and m["eval_accuracy_ci95"] == [0.301, 0.954] == m["eval_by_source"]["a"]["ci95"]
    rows = [{"source": "x", "i": i} for i in range(10)] + [{"source": "y", "i": i} for i in range(4)]
    out = weighted(rows, {"x": 1.5, "y": 0.5}, seed=0)
    xs, ys = [r["i"] for r in out if r["source"] == "x"], [r["i"] for r in out if r["source"] == "y"]
    assert len(xs) == 15 and set(xs) == set(range(10)) and len(ys) == 2 and len(set(ys)) == 2
    # the run's seed draws the sampled share and the order: the same seed the same rows, other seeds others
    assert weighted(rows, {"x": 1.5, "y": 0.5}, seed=0) == out
    draws = {tuple(r["i"] for r in weighted(rows, {"x": 1.5, "y": 0.5}, seed=s) if r["source"] == "y") for s in range(6)}
    assert len(draws) > 1
    # a fraction of a pair rounds to the nearest: 0.9 of 3 pairs is 2.7, so 3 (not 2, its floor)
    assert len(weighted(rows[:3], {"x": 0.9}, seed=0)) == 3 and len(weighted(rows[:3], {"x": 0.6}, seed=0)) == 2


def test_reward_adapter_in_adapter_stack_scores_like_standalone(trained, tiny_models):
    """PPO's model (one base; reference, policy and reward adapters) gives the standalone reward model's scores."""
    from peft import PeftModel

    from pipeline.adapters import AdapterStack

    arch, stage, metrics = trained
    prof = profile_from(str(tiny_models[arch]))
    tok = load_tokenizer(prof)
    sft = stage.parent / "sft" / "adapter"
    stack = AdapterStack.build(prof, tok, {"reference": sft, "policy": sft, "reward": stage / "adapter"}, trainable=("policy",))
    alone = PeftModel.from_pretrained(load_base(prof, tok, kind="score"), str(stage / "adapter")).eval()
    last_token = PeftModel.from_pretrained(load_base(prof, tok, kind="score"), str(stage / "adapter")).eval()
    assert read_pooling(stage / "adapter") == "sum" == stack.pooling["reward"]  # configs/rm.yaml's pooling, saved
    pool_in_forward(alone, "sum")

    pairs = [json.loads(line) for line in open(stage / "eval_pairs.jsonl")][:8]
    seqs = [ids for p in pairs for ids in encode_pair(tok, p)]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        stacked = stack.scores("reward", ids, mask)
        standalone = alone(input_ids=ids, attention_mask=mask).logits[:, 0]
        stock = last_token(input_ids=ids, attention_mask=mask).logits[:, 0]
        policy_logits = stack.logits("policy", ids, mask)  # switching away and back changes nothing
        again = stack.scores("reward", ids, mask)
    torch.testing.assert_close(stacked, standalone, atol=1e-5, rtol=1e-5)
    assert (stacked - stock).abs().max() > 1e-2  # the pooling is read from the folder: the last token alone differs
    torch.testing.assert_close(again, stacked)
    assert policy_logits.shape[-1] == stack.causal_lm.config.vocab_size
    assert (stacked[0::2] > stacked[1::2]).float().mean() >= 0.9  # chosen above rejected, as trained


@pytest.mark.slow
def test_two_processes(tiny_models, marker_data, tmp_path):
    """Two real gloo processes, on this run's label export, with label strength as the margin and reward centering."""
    import datasets

    runs_dir = tmp_path / "runs"
    fake_sft(tiny_models["qwen2"], runs_dir, "t")
    export = StageRun("label-export", "t", str(runs_dir))
    export.prepare({})
    rows = [dict(r, annotator="ann", strength=random.Random(i).choice(["much", "slightly", ""]), agreement=1.0, is_tie=False)
            for i, r in enumerate(marker_rows(320, seed=1))]
    for i in range(20):  # ties, exported in both orders: trained on, never scored as right or wrong
        tie = marker_rows(1, seed=100 + i)[0]
        tie["prompt"] = [{"role": "user", "content": f"A tie, number {i}."}]
        rows += [dict(tie, annotator="ann", strength="", agreement=1.0, is_tie=True),
                 dict(tie, chosen=tie["rejected"], rejected=tie["chosen"], annotator="ann", strength="", agreement=1.0, is_tie=True)]
    datasets.Dataset.from_list(rows).save_to_disk(str(export.dir / "dataset"))
    export.finish({"dataset": export.dir / "dataset"}, {}, {})
    mixture = json.dumps({"label-export": {"weight": 1.0}})
    res = run_module("stages.rm", rm_args(tiny_models["qwen2"], runs_dir, "t", "--dataset_mixture", mixture, "--margin_scale",
                                          "1.0", "--center_rewards_coefficient", "0.01", "--per_device_train_batch_size", "4"),
                     processes=2, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    manifest = json.loads((runs_dir / "t" / "rm" / "manifest.json").read_text())
    m = manifest["metrics"]
    assert m["world_size"] == 2
    assert m["eval_accuracy"] >= 0.9 and m["reload_check"]["max_abs_diff"] <= 1e-4, m
    assert set(m["eval_by_source"]) == {"label-export"} and "label-export" in manifest["upstream"]
    # what it read, for `make`: the label export's manifest digest (a new export makes this reward model out of date)
    assert manifest["inputs"]["manifests"]["label-export"] == manifest_digest(json.loads((export.dir / "manifest.json").read_text()))
    eval_prompts = [json.loads(line)["prompt"][0]["content"] for line in open(runs_dir / "t" / "rm" / "eval_pairs.jsonl")]
    assert len(eval_prompts) == m["eval_pairs"] and not [p for p in eval_prompts if p.startswith("A tie")]
    assert m["pairs_by_source"]["label-export"]["read"] == 360


def one_and_two_processes_over_an_epochs_end(tiny_models, tmp_path):
    """Runs "one" and "two" with a fake SFT stage each, and the flags of 14 logged steps over 84 training pairs of 105
    (an epoch of 8-pair steps ends on 4 of them): (the runs folder, the flags)."""
    runs_dir = tmp_path / "runs"
    for run in ("one", "two"):
        fake_sft(tiny_models["llama"], runs_dir, run)
    data = write_jsonl(tmp_path / "pairs.jsonl", marker_rows(105))
    # random order: group_by_length draws its megabatches by the rank's batch size, so 1 x 8 and 2 x 4 see other orders
    return runs_dir, ["--dataset_name", str(data), "--max_steps", "14", "--logging_steps", "1", "--learning_rate",
                      "2e-3", "--train_sampling_strategy", "random"]


@pytest.mark.slow
def test_two_processes_match_one_process_across_an_epochs_end(tiny_models, tmp_path):
    """Batches by prompt, 1 x 8 prompts against 2 x 4, over an epoch whose last batch holds 4 of its own prompts:
    accelerate fills rank 1's last batch with 4 prompts from the epoch's start, which weigh nothing
    (stages/epoch_end.py). Every logged loss and the held-out accuracy agree, through the second epoch."""
    runs_dir, common = one_and_two_processes_over_an_epochs_end(tiny_models, tmp_path)
    one = run_module("stages.rm", rm_args(tiny_models["llama"], runs_dir, "one", *common))
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_module("stages.rm", rm_args(tiny_models["llama"], runs_dir, "two", *common, "--per_device_train_batch_size",
                                          "4"), processes=2, timeout=400)
    assert two.returncode == 0, two.stderr[-3000:]
    m1, m2 = (json.loads((runs_dir / n / "rm/manifest.json").read_text())["metrics"] for n in ("one", "two"))
    assert m1["world_size"] == 1 and m2["world_size"] == 2 and m1["train_pairs"] == m2["train_pairs"] == 84, m1
    assert len(m1["loss_curve"]) == len(m2["loss_curve"]) == 14  # step 11 ends the first epoch
    diffs = [abs(a - b) for a, b in zip(m1["loss_curve"], m2["loss_curve"])]
    # Seen: at most 9e-8 (a few float32 ulps of the loss): 1e-6 leaves room for another reduction order only.
    assert max(diffs) < 1e-6, (m1["loss_curve"], m2["loss_curve"])
    assert abs(m1["eval_loss"] - m2["eval_loss"]) < 1e-6, (m1["eval_loss"], m2["eval_loss"])


def test_data_formats_drops_and_mixture(tiny_models, tmp_path):
    prof = profile_from(str(tiny_models["llama"]))
    tok = load_tokenizer(prof)
    conv = marker_rows(3)
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in conv]
    plain = marker_rows(3, plain=True)
    explicit_plain = [{"prompt": "Q: hi.", "chosen": " yes", "rejected": " no"}]
    bad = [dict(conv[0], rejected=conv[0]["chosen"]),                                    # equal
           dict(conv[1], rejected=[{"role": "assistant", "content": "  "}]),              # empty
           {"prompt": "Q", "chosen": "same", "rejected": "same"}]                          # equal, plain
    cases = {"conv": conv, "implicit": implicit, "plain": plain, "explicit_plain": explicit_plain}
    for name, rows in cases.items():
        pairs, _, counts, _ = load_pairs(RMArgs(dataset_name=str(write_jsonl(tmp_path / f"{name}.jsonl", rows))), None, 0)
        assert len(pairs) == len(rows) and dict(counts) == {name: {"read": len(rows)}}
        for p in pairs:
            assert p["prompt"]
            c, r = encode_pair(tok, p)
            assert c != r
            if isinstance(p["chosen"], str):
                assert c[-1] == tok.eos_token_id  # plain text gets an EOS, as RewardTrainer adds it
    # the implicit conversational prompt is recovered exactly
    pairs, _, _, _ = load_pairs(RMArgs(dataset_name=str(tmp_path / "implicit.jsonl")), None, 0)
    assert [p["prompt"] for p in pairs] == [r["prompt"] for r in conv]
    for rows in (bad[:2], bad[2:]):  # one file per format: a jsonl column holds one type
        pairs, _, counts, _ = load_pairs(RMArgs(dataset_name=str(write_jsonl(tmp_path / "bad.jsonl", rows))), None, 0)
        assert pairs == [] and counts["bad"]["equal"] + counts["bad"]["empty"] == len(rows)

    # mixture from the assistant recipe's YAML: bundled files by source name, per-source weights on training rows
    train_cfg, args, run = parse_args(["--config", str(REPO / "configs/recipes/assistant/rm.yaml")])
    assert "label-export" in args.dataset_mixture and train_cfg.max_length
    stage = StageRun("rm", "nolabels", str(tmp_path / "runs"))
    pairs, weights, counts, name = load_pairs(args, stage, 0)
    assert {p["source"] for p in pairs} == {"oasst", "pandalm", "tulu"} and "label-export" not in weights
    assert sum(c["read"] for c in counts.values()) == 2400 and counts["tulu"]["equal"] == 1 and counts["pandalm"]["empty"] > 0
    doubled = weighted(pairs[:10], {pairs[0]["source"]: 2.0}, 0)
    assert len(doubled) == 10 + sum(p["source"] == pairs[0]["source"] for p in pairs[:10])

    # held out by prompt: PandaLM has ~6 pairs per prompt, and none of its prompts may sit in both halves
    train_cfg, args, _ = parse_args(["--config", str(REPO / "configs/rm.yaml"), "--max_length", "4096",
                                     "--dataset_name", "data/preferences/pandalm.jsonl"])
    train_rows, eval_rows, counts, _ = prepare_data(args, train_cfg, stage, tok)
    train_prompts, eval_prompts = ({json.dumps(r["prompt"]) for r in rows} for rows in (train_rows, eval_rows))
    assert not train_prompts & eval_prompts and len(eval_rows) > len(eval_prompts)
    assert counts["pandalm"]["eval"] == len(eval_rows) and counts["pandalm"]["empty"] == 52


def test_plain_text_pairs_with_a_prompt_train_on_what_ppo_scores(tiny_models, tmp_path):
    """A plain-text pair with its prompt ({"prompt": "...", "chosen": "...", "rejected": "..."}) trained the reward
    model on prompt + reply + EOS without the chat template, while PPO and eval score the templated conversation: it
    is read as a user turn and assistant replies (as SFT reads prompt-completion rows), so the ids it trains on are
    exactly the ones PPO's rollouts give it. Without a prompt (one text holding both) it stays text. Mutant: the pair
    kept as text."""
    from pipeline.generation import chat_reward_inputs

    tok = load_tokenizer(profile_from(str(tiny_models["llama"])))
    rows = [{"prompt": "Is the otter nice?", "chosen": "Yes, the otter is lovely.", "rejected": "No. Bad otter."}]
    pairs, _, _, _ = load_pairs(RMArgs(dataset_name=str(write_jsonl(tmp_path / "plain.jsonl", rows))), None, 0)
    user = [{"role": "user", "content": "Is the otter nice?"}]
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [
        (user, [{"role": "assistant", "content": "Yes, the otter is lovely."}],
         [{"role": "assistant", "content": "No. Bad otter."}])]
    chosen, rejected = encode_pair(tok, pairs[0])
    ids, mask, starts = chat_reward_inputs(tok, [user, user], ["Yes, the otter is lovely.", "No. Bad otter."])
    assert [chosen, rejected] == [ids[i][mask[i].bool()].tolist() for i in range(2)]
    assert reply_start(tok, pairs[0], chosen, rejected) == int(starts[0])
    # a base without a chat template (its PPO scores plain tokens): the pair stays text, templating would fail
    pairs, _, _, _ = load_pairs(RMArgs(dataset_name=str(tmp_path / "plain.jsonl")), None, 0, templated=False)
    assert (pairs[0]["prompt"], pairs[0]["chosen"]) == ("Is the otter nice?", "Yes, the otter is lovely.")
    implicit = [{"chosen": "Is the otter nice? Yes.", "rejected": "Is the otter nice? No."}]
    pairs, _, _, _ = load_pairs(RMArgs(dataset_name=str(write_jsonl(tmp_path / "implicit.jsonl", implicit))), None, 0)
    assert isinstance(pairs[0]["chosen"], str) and isinstance(pairs[0]["prompt"], str)


def test_prompt_kinds_and_empty_replies(tmp_path):
    """A prompt of the other kind than its replies is refused before TRL's maybe_extract_prompt drops it (a text
    prompt beside assistant turns alone came out as prompt []), unless the conversations hold it as a user turn
    (ultrafeedback_binarized's layout); an empty text reply is dropped as empty (TRL's extract_prompt raised
    UnboundLocalError), and a reply ending in a space is not empty."""
    user, bot = ({"role": role, "content": text} for role, text in (("user", "Capital of France?"), ("assistant", "Paris.")))
    rome = {"role": "assistant", "content": "Rome."}
    mixed = {"text_prompt": {"prompt": "Capital of France?", "chosen": [bot], "rejected": [rome]},
             "messages_prompt": {"prompt": [user], "chosen": "Paris.", "rejected": "Rome."}}
    for name, row in mixed.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", [row])
        with pytest.raises(ConfigError, match=f"^{path} row 1 mixes plain-text and conversational fields: give prompt, "
                                              f"chosen and rejected all as strings or all as lists"):
            load_pairs(RMArgs(dataset_name=str(path)), None, 0)
    whole = write_jsonl(tmp_path / "whole.jsonl", [{"prompt": "Capital of France?", "chosen": [user, bot],
                                                    "rejected": [user, rome]}])
    pairs, _, _, _ = load_pairs(RMArgs(dataset_name=str(whole)), None, 0)
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [([user], [bot], [rome])]

    rows = [{"chosen": "", "rejected": "Something."}, {"chosen": "Yes ", "rejected": "No"},
            {"chosen": "Sure.", "rejected": "  "}]
    pairs, _, counts, _ = load_pairs(RMArgs(dataset_name=str(write_jsonl(tmp_path / "blank.jsonl", rows))), None, 0)
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [("", "Yes ", "No")]
    assert dict(counts) == {"blank": {"read": 3, "empty": 2}}


@pytest.mark.parametrize("weight", [-1, -0.5, True, False])
def test_a_mixtures_weight_is_a_number_not_negative_nor_a_bool(weight):
    """weight -1 dropped the source's pairs without a word, -0.5 failed inside random.sample, and true / false read as
    1 / 0: each refused at parse, naming the source."""
    from stages.rm_data import checked_mixture

    source = "data/preferences/tulu.jsonl"
    problem = "has a negative weight" if not isinstance(weight, bool) else f"has weight {weight}: it must be a number"
    with pytest.raises(ValueError, match=rf"^dataset_mixture\['{source}'\] {problem}"):
        checked_mixture({source: {"weight": weight}})
    assert checked_mixture({source: {"weight": 0.5}}) == {source: {"weight": 0.5}}


@pytest.mark.parametrize("rows", [-5, 0.5])
def test_a_mixtures_max_rows_is_a_whole_number(rows, tmp_path):
    """max_rows -5 kept all but 5 of a source's pairs and 0.5 none (rows[:0]): one error naming the file (or the flag)
    and the source. A whole number keeps that many, 0 all."""
    source = "data/preferences/tulu.jsonl"
    variant = tmp_path / "rm.yaml"
    variant.write_text(f"base_config: configs/rm.yaml\ndataset_mixture: {{{source}: {{max_rows: {rows}}}}}\n")
    problem = f"dataset_mixture\\['{source}'\\] has max_rows {rows}: give the pairs to keep from it, a whole number \\(0 = all\\)$"
    with pytest.raises(ConfigError, match=f"^invalid value of 'dataset_mixture' in {variant}: {problem}"):
        parse_args(["--config", str(variant)])
    with pytest.raises(ConfigError, match=f"^invalid value of --dataset_mixture on the command line: {problem}"):
        parse_args(["--config", str(REPO / "configs/rm.yaml"), "--dataset_mixture", json.dumps({source: {"max_rows": rows}})])
    for n in (3, 0):  # the file's 774 rows, less its equal and empty pairs, are usable
        _, args, _ = parse_args(["--config", str(REPO / "configs/rm.yaml"), "--dataset_mixture",
                                 json.dumps({source: {"max_rows": n}})])
        pairs, _, counts, _ = load_pairs(args, None, 0)
        usable = 774 - counts["tulu"]["equal"] - counts["tulu"]["empty"]
        assert counts["tulu"]["read"] == 774 and usable > 3 and len(pairs) == (n or usable)


def test_bad_input_fails_cleanly(tiny_models, marker_data, tmp_path, capsys):
    runs_dir = tmp_path / "runs"
    fake_sft(tiny_models["llama"], runs_dir, "t")
    # 1. no chosen/rejected: one line on stderr, exit code 2, no manifest (the command line as `make rm` runs it)
    no_pairs = write_jsonl(tmp_path / "sft_like.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 4)
    res = run_python("stages.rm", rm_args(tiny_models["llama"], runs_dir, "t", "--dataset_name", str(no_pairs)), timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "chosen" in last and "Traceback" not in res.stderr
    # 2. every pair filtered out
    rows = [dict(r, rejected=r["chosen"]) for r in marker_rows(6)]
    with pytest.raises(ConfigError, match="no usable preference pairs"):
        main(*parse_args(rm_args(tiny_models["llama"], runs_dir, "t", "--dataset_name", str(write_jsonl(tmp_path / "eq.jsonl", rows)))))
    # 3. the run's SFT adapter was trained on another base: the reward model would not stack with the policy
    with pytest.raises(ConfigError, match="trained on base"):
        main(*parse_args(rm_args(tiny_models["gpt2"], runs_dir, "t", "--dataset_name", str(marker_data["conversational"]))))
    # 4. a pooling that does not exist: one error line naming the flag, nothing written
    bad_pooling = rm_args(tiny_models["llama"], runs_dir, "t", "--dataset_name", str(marker_data["conversational"]),
                          "--pooling", "mean")
    code, stderr = guarded_exit(lambda: main(*parse_args(bad_pooling)), capsys)  # as the stage's __main__ runs it
    assert code == 2 and stderr.strip().splitlines()[-1].startswith("error: ")
    assert "--pooling mean" in stderr and "last, sum" in stderr and "Traceback" not in stderr
    # 5. no SFT stage in this run
    with pytest.raises(ConfigError, match="make sft"):
        main(*parse_args(rm_args(tiny_models["llama"], runs_dir, "nosft", "--dataset_name", str(marker_data["conversational"]))))
    assert not list(runs_dir.glob("*/rm/manifest.json"))


def test_a_base_with_its_own_code_trains_and_reloads(custom_code_model, tmp_path):
    """The profile's trust_remote_code reaches every load of the base: the SFT adapter's check against the base's
    config and the fresh-process reload check both refused it ("contains custom code") without the flag."""
    runs_dir = tmp_path / "runs"
    fake_sft(custom_code_model, runs_dir, "t")
    data = write_jsonl(tmp_path / "marker.jsonl", marker_rows(40))
    m = main(*parse_args(rm_args(custom_code_model, runs_dir, "t", "--dataset_name", str(data), "--num_train_epochs", "1")))
    assert m["eval_pairs"] == 8 and m["train_pairs"] == 32 and m["reload_check"]["max_abs_diff"] <= 1e-4


def test_reward_adapter_for_another_base_is_refused(trained, tiny_models):
    from pipeline.adapters import AdapterStack

    arch, stage, _ = trained
    other = "gpt2" if arch != "gpt2" else "llama"
    prof = profile_from(str(tiny_models[other]))
    with pytest.raises(ConfigError, match="trained on base"):
        AdapterStack.build(prof, load_tokenizer(prof), {"reward": stage / "adapter"})


STOCK_RELOAD = """
import json, os, sys, torch
from peft import AutoPeftModelForSequenceClassification
from transformers import AutoTokenizer
adapter, pairs_file = sys.argv[1:]
tok = AutoTokenizer.from_pretrained(adapter)
model = AutoPeftModelForSequenceClassification.from_pretrained(adapter, num_labels=1).eval()
pairs = [json.loads(line) for line in open(pairs_file)]
texts = [tok.apply_chat_template(p["prompt"] + p[k], tokenize=False) for k in ("chosen", "rejected") for p in pairs]
batch = tok(texts, padding=True, add_special_tokens=False, return_tensors="pt")
rule = json.load(open(os.path.join(adapter, "score_pooling.json")))
def shared(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
with torch.no_grad():
    stock = model(**batch).logits[:, 0]
    if rule["pooling"] == "sum":  # as the adapter's score_pooling.json says, with nothing of ours: the reply's tokens
        classifier = model.get_base_model()
        per_token = classifier.score(getattr(classifier, classifier.base_model_prefix)(**batch).last_hidden_state)[..., 0]
        ids, n = batch["input_ids"].tolist(), len(pairs)
        starts = []
        for i, p in enumerate(pairs):  # the reply starts after the prompt and its generation prompt
            prompt = tok(tok.apply_chat_template(p["prompt"], tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"]
            starts.append(min(shared(ids[i], prompt), shared(ids[i], ids[n + i])))
        reply = torch.zeros_like(batch["attention_mask"])
        for row, start in enumerate(starts + starts):  # right-padded, no pad id inside
            reply[row, start:] = batch["attention_mask"][row, start:]
        stock = (per_token * reply).sum(1) / rule["sum_divisor"]
print(json.dumps(stock.tolist()))
"""


@pytest.mark.parametrize("trained", ["llama"], indirect=True)  # one architecture: the reload path does not depend on it
def test_stock_reload_in_fresh_process_and_lost_head(trained, tmp_path):
    """A user's own script (stock peft, the tokenizer beside the adapter, another working directory) gets the stage's
    scores. And the known failure elsewhere, a head not saved with LoRA so that the reloaded model scores at random,
    makes the stage's reload check fail. (A head missing from the file altogether already fails to load in peft.)"""
    from safetensors.torch import load_file, save_file

    arch, stage, _ = trained
    scores = json.loads((stage / "reload_check.json").read_text())  # what the stage's own check got: it passed
    res = subprocess.run([sys.executable, "-c", STOCK_RELOAD, str(stage / "adapter"), str(stage / "eval_pairs.jsonl")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    stock = json.loads(res.stdout.strip().splitlines()[-1])
    torch.testing.assert_close(torch.tensor(stock), torch.tensor(scores["chosen"] + scores["rejected"]), atol=1e-4, rtol=0)

    broken = tmp_path / "adapter"
    shutil.copytree(stage / "adapter", broken)
    torch.manual_seed(0)
    weights = load_file(broken / "adapter_model.safetensors")
    save_file({k: torch.randn_like(v) * 0.02 if ".score." in k else v for k, v in weights.items()},  # a fresh head
              broken / "adapter_model.safetensors")
    with pytest.raises(RuntimeError, match="does not reproduce"):
        check_reload([broken], stage / "eval_pairs.jsonl", [(scores["chosen"], scores["rejected"])])


# ---------------------------------------------------------------- long pairs are cut, not dropped; training length

def test_truncate_pair_keeps_prompt_end_and_response_ends():
    """Hand-computed: BOS + a 10-token prompt, responses of 30 and 40 tokens, max_length 32, max_prompt_length 4.
    The prompt keeps its last 4 tokens; each response is capped at 32 - 1 - 4 = 27 tokens: its first 21 and last 6
    (a quarter of the cap), so its ending (here: the EOS-like last token) is still there."""
    bos, prompt = [1], list(range(10, 20))
    chosen, rejected = bos + prompt + list(range(100, 130)), bos + prompt + list(range(200, 240))
    c, r, prompt_cut, response_cut = truncate_pair(chosen, rejected, 32, 4, bos_token_id=1)
    assert c == [1, 16, 17, 18, 19] + list(range(100, 121)) + list(range(124, 130))
    assert r == [1, 16, 17, 18, 19] + list(range(200, 221)) + list(range(234, 240))
    assert prompt_cut and response_cut and len(c) == len(r) == 32
    # short responses: only the prompt is cut (from the front), the responses stay whole
    c, r, prompt_cut, response_cut = truncate_pair(bos + prompt + [7, 8], bos + prompt + [9], 8, 4, bos_token_id=1)
    assert c == [1, 15, 16, 17, 18, 19, 7, 8] and r == [1, 15, 16, 17, 18, 19, 9] and prompt_cut and not response_cut
    # a prompt shorter than max_prompt_length leaves the responses the rest: cap 20 - 1 - 2 = 17 (13 + the last 4),
    # and the prompt is not cut
    short = [10, 11]
    c, r, prompt_cut, response_cut = truncate_pair(bos + short + list(range(100, 130)), bos + short + list(range(200, 240)),
                                                   20, 4, bos_token_id=1)
    assert c == [1, 10, 11] + list(range(100, 113)) + list(range(126, 130)) and len(r) == 20
    assert not prompt_cut and response_cut
    # a cap of 3 still keeps each response's last token (its EOS): first 2 + last 1
    c, r, _, _ = truncate_pair(bos + short + list(range(100, 110)), bos + short + list(range(200, 210)), 6, 2,
                               bos_token_id=1)
    assert c == [1, 10, 11, 100, 101, 109] and r == [1, 10, 11, 200, 201, 209]
    # a pair that fits is returned as it is
    assert truncate_pair([1, 2, 3], [1, 2, 4], 3, 1, bos_token_id=1) == ([1, 2, 3], [1, 2, 4], False, False)
    # a cap of 1 (6 - BOS - 4 prompt tokens) leaves no room for a response's beginning and end: the pair does not fit
    assert truncate_pair(chosen, rejected, 6, 4, bos_token_id=1) is None
    assert truncate_pair(chosen, rejected, 7, 4, bos_token_id=1) == ([1, 16, 17, 18, 19, 100, 129],
                                                                     [1, 16, 17, 18, 19, 200, 239], True, True)


def test_long_pairs_are_truncated_and_counted(tiny_models, tmp_path):
    """The real tokenizer and chat template: a long pair is cut to max_length, still begins with the start of the
    sequence and ends exactly as the whole one does (EOS and the template's closing newline); cuts are counted."""
    prof = profile_from(str(tiny_models["llama"]))
    tok = load_tokenizer(prof)
    long_text = " ".join(WORDS * 12)
    rows = marker_rows(6)
    rows[0] = dict(rows[0], prompt=[{"role": "user", "content": long_text}])                                 # prompt
    rows[1] = dict(rows[1], chosen=[{"role": "assistant", "content": long_text + " banana the end"}])      # response
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    train_cfg, args, _ = parse_args(["--config", str(REPO / "configs/rm.yaml"), "--dataset_name", str(data),
                                     "--max_length", "64", "--max_prompt_length", "16", "--eval_fraction", "0.5"])
    train_rows, eval_rows, counts, _ = prepare_data(args, train_cfg, None, tok)
    assert len(train_rows) + len(eval_rows) == 6  # nothing dropped
    # row 0: a long prompt; row 1: a long response, which leaves its (over 16-token) prompt only 16 tokens
    assert counts["long"]["prompt_cut"] == 2 and counts["long"]["response_cut"] == 1
    assert len(encode_pair(tok, rows[1])[0]) > 64 and len(encode_pair(tok, rows[2])[0]) <= 64
    for row in train_rows + eval_rows:
        whole_c, whole_r = encode_pair(tok, {k: row[k] for k in ("prompt", "chosen", "rejected")})
        for cut, whole in ((row["chosen_ids"], whole_c), (row["rejected_ids"], whole_r)):
            assert len(cut) <= 64 and cut[0] == whole[0] == tok.bos_token_id
            assert cut[-4:] == whole[-4:] and tok.eos_token_id in cut[-3:]
        assert row["full_lengths"] == [len(whole_c), len(whole_r)]
        # the replies start where they did in the whole pair, moved back by the prompt tokens cut out: DPO splits the
        # pair there (it split a cut prompt's at 0 or 1, its "completion" the prompt), a summing reward model sums
        # from there
        whole_start = reply_start(tok, row, whole_c, whole_r)
        start = row["reply_start"]
        if row["prompt"][0]["content"] == long_text:  # the cut prompt: its end and the template's header kept
            assert 16 <= start < whole_start and row["chosen_ids"][:start] != whole_c[:start]
        assert row["chosen_ids"][start:start + 3] == whole_c[whole_start:whole_start + 3]
        assert row["chosen_ids"][start - 3:start] == whole_c[whole_start - 3:whole_start]  # the header, whole
    train_cfg, args, _ = parse_args(["--config", str(REPO / "configs/rm.yaml"), "--dataset_name", str(data),
                                     "--max_length", "64", "--max_prompt_length", "40"])
    with pytest.raises(ConfigError, match="max_prompt_length"):  # more than half: no room left for the responses
        prepare_data(args, train_cfg, None, tok)


def test_a_given_text_prompt_is_not_cut_at_its_last_line_break(tmp_path):
    """Only a prompt TRL took from the texts' shared start (implicit) is cut after its last line break for the split
    key: two given text prompts that share their first line (a base without a chat template keeps them as text) are
    two prompts, not one."""
    from stages.rm_data import split_keys

    rows = [{"prompt": f"Context:\nQ{i}", "chosen": " yes", "rejected": " no"} for i in (1, 2)] + \
        [{"chosen": "Q3\nyes", "rejected": "Q3\nno"}]
    pairs, _, _, _ = load_pairs(RMArgs(dataset_name=str(write_jsonl(tmp_path / "text.jsonl", rows))), None, 0,
                                templated=False)
    assert [p["implicit_prompt"] for p in pairs] == [False, False, True]
    assert len(set(split_keys(pairs))) == 3


def test_max_prompt_length_is_refused_below_0_as_above_half_of_max_length():
    """A negative max_prompt_length gave the responses more than max_length (truncate_pair's cap counts -1 prompt
    tokens): a 33-token sequence at max_length 32. Refused, as one above half is, before any data is read."""
    from types import SimpleNamespace

    from stages.rm import RMArgs
    from stages.rm_data import prepare_data

    chosen, rejected = [1, *range(10, 20), *range(100, 140)], [1, *range(10, 20), *range(200, 230)]
    assert max(map(len, truncate_pair(chosen, rejected, 32, 0, 1)[:2])) == 32
    for n in (-1, 33):
        with pytest.raises(ConfigError, match=rf"^max_prompt_length {n} must be between 0 and half of max_length \(64\)"):
            prepare_data(RMArgs(max_prompt_length=n), SimpleNamespace(max_length=64), None, None)


@pytest.mark.parametrize("stage_name", ["rm", "dpo"])
def test_your_own_pairs_leave_the_recipes_bundled_files_out_of_the_inputs(stage_name, tmp_path, monkeypatch):
    """--dataset_name replaces the recipe's mixture (DPO's: the one it takes from rm_config): its bundled files are not
    read, so they are not inputs of the run (editing one must not make `make` train the stage again). Stopped before
    the model loads. Mutant: the stage not telling its StageRun (not_inputs), so the three bundled files stay inputs."""
    import importlib

    stage_module = importlib.import_module(f"stages.{stage_name}")
    mine = write_jsonl(tmp_path / "mine.jsonl", marker_rows(4))
    stage = stage_run_before_the_model(monkeypatch, stage_module, stage_module.parse_args, [
        "--config", str(REPO / f"configs/recipes/assistant/{stage_name}.yaml"), "--dataset_name", str(mine),
        "--runs_dir", str(tmp_path / "runs"), "--run", "r"])
    bundled = {f"data/preferences/{name}.jsonl" for name in ("oasst", "pandalm", "tulu")}
    assert bundled <= stage.not_read and str(mine) not in stage.not_read


def test_a_pairwise_pairs_length_for_grouping_is_its_longer_sequence(tiny_models, tmp_path, monkeypatch):
    """In TRL's own (pairwise) batches, `length`, what configs/rm.yaml's group_by_length batches by, is the longer of a
    pair's two sequences, the width the collator pads the pair to (as DPO's: tests/test_dpo.py). Stopped where the
    first member would train. Mutant: the shorter one, grouping a long pair with short ones."""
    import stages.rm as rm

    class Stop(Exception):
        pass

    seen = []

    def train_member(train_cfg, plan, profile, tokenizer, shard, peft_config, train_set, *rest):
        seen.append(train_set)
        raise Stop

    rows = [{"prompt": [{"role": "user", "content": f"Say something {i}."}],
             "chosen": [{"role": "assistant", "content": "Banana." if i % 2 else "Banana " + "and more " * (i + 1)}],
             "rejected": [{"role": "assistant", "content": "Window " + "and more " * (i + 1) if i % 2 else "Window."}]}
            for i in range(10)]
    runs_dir = tmp_path / "runs"
    fake_sft(tiny_models["llama"], runs_dir, "t")
    monkeypatch.setattr(rm, "train_member", train_member)
    with pytest.raises(Stop):
        main(*parse_args(rm_args(tiny_models["llama"], runs_dir, "t", "--dataset_name",
                                 str(write_jsonl(tmp_path / "p.jsonl", rows)), "--batch_by_prompt", "false")))
    train_set = seen[0]
    assert len(train_set) == 8 and any(len(r["chosen_ids"]) != len(r["rejected_ids"]) for r in train_set)
    assert train_set["length"] == [max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in train_set]


def stage_run_before_the_model(monkeypatch, stage_module, parse, argv: list[str]) -> StageRun:
    """The StageRun a stage's main makes, the stage stopped where it reads the model profile (before any model
    loads or the run folder is touched): what the stage counts as its inputs."""

    class Stop(Exception):
        pass

    made = []

    class Recorded(StageRun):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    def stop(*_):
        raise Stop

    monkeypatch.setattr(stage_module, "StageRun", Recorded)
    monkeypatch.setattr(stage_module, "profile_from", stop)
    with pytest.raises(Stop):
        stage_module.main(*parse(argv))
    return made[0]


def test_plan_steps_follows_the_data():
    """At least min_steps and one epoch, at most max_epochs; evaluations spread so that the last step is one."""
    def plan(n, *extra):
        train_cfg, args, _ = parse_args(["--config", str(REPO / "configs/rm.yaml"), "--min_steps", "300",
                                         "--max_epochs", "10", "--evals", "8", "--per_device_train_batch_size", "8",
                                         *extra])
        return plan_steps(n, train_cfg, args, world_size=1), train_cfg

    p, cfg = plan(240)  # 30 steps an epoch: 300 steps (10 epochs), evaluated every 38 -> 304
    assert p == {"steps": 304, "steps_per_epoch": 30, "epochs": 10.13, "eval_steps": 38}
    assert cfg.max_steps == 304 and cfg.eval_steps == cfg.save_steps == 38
    assert plan(40)[0]["steps"] == 56  # 5 an epoch: capped at 10 epochs = 50, evaluated every 7 -> 56
    assert plan(4000)[0]["steps"] == 504  # 500 an epoch: one epoch, every 63 -> 504
    def fixed(n, *extra):  # max_steps or num_train_epochs fix the length (min_steps beside them: an error)
        train_cfg, args, _ = parse_args(["--config", str(REPO / "configs/rm.yaml"), "--evals", "1",
                                         "--per_device_train_batch_size", "8", *extra])
        return plan_steps(n, train_cfg, args, world_size=1)

    assert fixed(240, "--max_steps", "17")["steps"] == 17  # given explicitly: as given
    assert fixed(240, "--num_train_epochs", "2")["steps"] == 60
    assert fixed(244, "--num_train_epochs", "0.5")["steps"] == 16  # half of 31 steps: the half-step rounds up
    assert plan(240, "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2")[0]["steps_per_epoch"] == 30
    # a last, partial batch is a step of the epoch: 244 pairs are 31 steps of 8 (30 would leave 4 pairs unseen), and
    # 12 pairs with min_steps 1 still get their one epoch, 2 steps
    assert plan(244)[0]["steps_per_epoch"] == 31
    assert plan(12, "--min_steps", "1", "--evals", "1")[0]["steps"] == 2
    # every process takes its own batch of a step: 2 processes x 8 = 16 pairs a step, 240 pairs 15 steps an epoch;
    # 300 steps capped at 10 epochs = 150, evaluated every 19 -> 152
    train_cfg, args, _ = parse_args(["--config", str(REPO / "configs/rm.yaml"), "--min_steps", "300", "--max_epochs",
                                     "10", "--evals", "8", "--per_device_train_batch_size", "8"])
    assert plan_steps(240, train_cfg, args, world_size=2) == {"steps": 152, "steps_per_epoch": 15, "epochs": 10.13,
                                                              "eval_steps": 19}


def test_plan_steps_rounds_a_fractional_epoch_cap_up():
    """max_epochs 2.5 of 5 steps an epoch caps the run at 12.5 steps: 13, the half step trained (as a fractional
    num_train_epochs rounds up), not 12."""
    train_cfg, args, _ = parse_args(["--config", str(REPO / "configs/rm.yaml"), "--min_steps", "300", "--max_epochs",
                                     "2.5", "--evals", "1", "--per_device_train_batch_size", "8"])
    assert plan_steps(40, train_cfg, args, world_size=1) == {"steps": 13, "steps_per_epoch": 5, "epochs": 2.6,
                                                             "eval_steps": 13}


def test_the_training_record_by_hand():
    """The manifest's training record: every logged loss in order, the last logged training accuracy (not the first),
    each evaluation rounded to 4 places, and the best checkpoint's step and metric."""
    from types import SimpleNamespace

    from stages.rm import training_record

    logs = [{"loss": 0.7, "accuracy": 0.5, "step": 4}, {"eval_loss": 0.69314, "eval_accuracy": 0.55556, "step": 5},
            {"loss": 0.6, "accuracy": 0.75, "step": 8}, {"eval_loss": 0.5, "step": 10},
            {"train_runtime": 1.0, "step": 10}]
    state = SimpleNamespace(log_history=logs, best_model_checkpoint="/r/trainer/checkpoint-10", global_step=10,
                            best_metric=0.5)
    record = training_record(state, SimpleNamespace(training_loss=0.65), {"steps": 10, "eval_steps": 5},
                             SimpleNamespace(metric_for_best_model="eval_loss"))
    assert record == {"train_loss": 0.65, "loss_curve": [0.7, 0.6], "train_accuracy_last": 0.75, "steps": 10,
                      "plan_steps": 10, "plan_eval_steps": 5,
                      "eval_curve": [{"step": 5, "eval_loss": 0.6931, "eval_accuracy": 0.5556},
                                     {"step": 10, "eval_loss": 0.5, "eval_accuracy": 0}],
                      "best_step": 10, "best_metric": {"eval_loss": 0.5}}


def test_the_training_record_counts_the_steps_trained_not_the_plan():
    """A Trainer stopped before its plan (a callback's should_training_stop) trained global_step steps: the record's
    `steps` is those 7, beside the 12 planned."""
    from types import SimpleNamespace

    from stages.rm import training_record

    state = SimpleNamespace(log_history=[{"loss": 0.7, "step": 7}], best_model_checkpoint=None, global_step=7,
                            best_metric=None)
    record = training_record(state, SimpleNamespace(training_loss=0.7), {"steps": 12, "eval_steps": 6},
                             SimpleNamespace(metric_for_best_model="eval_loss"))
    assert (record["steps"], record["plan_steps"], record["best_step"]) == (7, 12, None)


def test_best_checkpoint_is_the_one_saved(tiny_models, tmp_path):
    """Pairs with a rule to learn (" banana" better than " window") but for the held-out prompts', which have it the
    other way round, at a high constant learning rate: the better the model learns the rule, the worse its held-out
    loss, so the best evaluation is the first, not the last. (Labels at random left the held-out loss to wander, and
    on another CPU its last evaluation was the best.) The saved adapter is the best one: its held-out loss, scored
    again by the stage after training, equals the best evaluation's, not the last's."""
    from datasets import Dataset

    from pipeline.data import train_eval_split
    from stages.rm_data import split_keys

    runs_dir = tmp_path / "runs"
    fake_sft(tiny_models["llama"], runs_dir, "t")
    rows = marker_rows(80)
    train_cfg, args, _ = parse_args(["--config", str(REPO / "configs/rm.yaml")])
    _, held = train_eval_split(Dataset.from_dict({"i": list(range(len(rows))), "group": split_keys(rows)}),
                               args.eval_fraction, train_cfg.seed, group_by=lambda r: r["group"])
    rows = [dict(r, chosen=r["rejected"], rejected=r["chosen"]) if i in set(held["i"]) else r for i, r in enumerate(rows)]
    data = write_jsonl(tmp_path / "noise.jsonl", rows)
    m = main(*parse_args(["--config", str(REPO / "configs/rm.yaml"), "--model_config", str(tiny_models["llama"]),
                          "--runs_dir", str(runs_dir), "--run", "t", "--dataset_name", str(data),
                          "--learning_rate", "3e-2", "--lr_scheduler_type", "constant", "--warmup_steps", "0",
                          "--min_steps", "40", "--max_epochs", "10", "--evals", "4", "--logging_steps", "5",
                          "--ensemble", "1"]))
    # 64 training pairs, 8 steps an epoch: min_steps 40 (5 epochs), evaluated every 10 steps
    assert (m["train_pairs"], m["plan_steps"], m["plan_eval_steps"], m["steps"]) == (64, 40, 10, 40)
    losses = {e["step"]: e["eval_loss"] for e in m["eval_curve"]}
    assert sorted(losses) == [10, 20, 30, 40]
    best = min(losses, key=losses.get)
    assert m["best_step"] == best and best != 40 and losses[40] > losses[best] + 1e-3, losses
    assert m["eval_loss"] == pytest.approx(losses[best], abs=2e-4)
    assert m["best_metric"] == {"eval_loss": pytest.approx(losses[best], abs=1e-4)}
    assert not (runs_dir / "t" / "rm" / "trainer").exists()  # the checkpoints are gone; adapter/ is the best one


def test_bf16_base_trains_the_score_head_in_float32(tiny_models_bf16, tmp_path, monkeypatch):
    """peft upcasts LoRA weights to fp32 but leaves the `modules_to_save` score head in the base's dtype: on a bf16
    base small AdamW steps on it rounded away (here, 4 steps at lr 2e-5 moved none of its elements). The stage trains
    the head in fp32, every element moves; the saved fp32 head scores as the trained model did in a stock bf16 reload
    (the stage's own check) and in the adapter stack PPO and eval use, where it is kept exactly."""
    from safetensors.torch import load_file
    from transformers import set_seed

    import stages.rm as rm
    from pipeline.adapters import AdapterStack
    from stages.rm_scoring import reload_verdict

    profile, runs_dir = tiny_models_bf16["llama"], tmp_path / "runs"
    fake_sft(profile, runs_dir, "t")
    data = write_jsonl(tmp_path / "marker.jsonl", marker_rows(40))
    seen, real_pair_scores = [], rm.pair_scores

    def pair_scores(model, *args, **kwargs):  # the trained model in memory and its held-out scores
        scores = real_pair_scores(model, *args, **kwargs)
        seen.append((model, scores))
        return scores

    monkeypatch.setattr(rm, "pair_scores", pair_scores)
    metrics = main(*parse_args(rm_args(profile, runs_dir, "t", "--dataset_name", str(data), "--learning_rate", "2e-5",
                                       "--max_steps", "4", "--evals", "1")))
    assert metrics["steps"] == 4 and metrics["reload_check"]["dtype"] == "bfloat16"
    (model, scores), = seen
    prof = profile_from(str(profile))
    tok = load_tokenizer(prof)
    set_seed(42)  # configs/rm.yaml's seed: the head as the stage initialised it
    start = load_base(prof, tok, kind="score").score.weight.detach()
    assert start.dtype == torch.bfloat16
    head = model.get_base_model().score.modules_to_save["default"].weight.detach().cpu()  # trained on the accelerator
    assert head.dtype == torch.float32
    assert (head != start.float()).all(), f"{int((head == start.float()).sum())} of {head.numel()} elements never moved"

    adapter = runs_dir / "t" / "rm" / "adapter"
    saved = [v for k, v in load_file(adapter / "adapter_model.safetensors").items() if ".score." in k]
    assert len(saved) == 1 and saved[0].dtype == torch.float32
    torch.testing.assert_close(saved[0], head, atol=0, rtol=0)

    # PPO's and eval's adapter stack on the bf16 base: the head exactly as saved, the held-out scores as trained
    stack = AdapterStack.build(prof, tok, {"reward": adapter})
    torch.testing.assert_close(stack.causal_lm.score.modules_to_save["reward"].weight.detach(), head, atol=0, rtol=0)
    rows = [json.loads(line) for line in open(runs_dir / "t" / "rm" / "eval_pairs.jsonl")]
    seqs = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        again = stack.scores("reward", ids, mask, torch.tensor([r["reply_start"] for r in rows + rows])).tolist()
    n = len(rows)
    verdict = reload_verdict(scores[:n], scores[n:], again[:n], again[n:], "bfloat16")
    assert verdict["ok"], (verdict, scores, again)


def test_ensemble_score_and_members_by_hand():
    """An ensemble's score is the mean of its members' standardised scores; one member's score is left as it is."""
    from pipeline.adapters import ensemble_score, reward_members

    scores = torch.tensor([[1.0, 3.0, 5.0], [2.0, 6.0, 0.0]])
    stats = [(1.0, 2.0), (2.0, 4.0)]
    # member 0: (1-1)/2, (3-1)/2, (5-1)/2 = 0, 1, 2; member 1: (2-2)/4, (6-2)/4, (0-2)/4 = 0, 1, -0.5
    assert ensemble_score(scores, stats).tolist() == [0.0, 1.0, 0.75]
    assert ensemble_score(scores[:1], stats[:1]).tolist() == [1.0, 3.0, 5.0]  # one model: its raw score
    old = {"outputs": {"adapter": "/r/rm/adapter"}, "metrics": {"reward_mean": 0.3, "reward_std": 2.0}}
    assert reward_members(old) == ({"reward": "/r/rm/adapter"}, [(0.0, 1.0)])
    new = {"outputs": {"adapter": "/r/rm/adapter", "members": json.dumps(["/r/rm/adapter", "/r/rm/member-1/adapter"])},
           "metrics": {"members": [{"reward_mean": 0.5, "reward_std": 2.0}, {"reward_mean": -1.0, "reward_std": 0.5}]}}
    assert reward_members(new) == ({"reward": "/r/rm/adapter", "reward-1": "/r/rm/member-1/adapter"},
                                   [(0.5, 2.0), (-1.0, 0.5)])


def test_adapter_of_names_the_adapter_after_peft_s_marker():
    """The adapter a parameter belongs to is the name after peft's marker (what trains, freezes and saves an adapter
    reads); a base weight, or a marker with nothing after it, belongs to none."""
    from pipeline.adapters import adapter_of

    assert adapter_of("base_model.model.model.layers.0.self_attn.q_proj.lora_A.policy.weight") == "policy"
    assert adapter_of("base_model.model.score.modules_to_save.value.weight") == "value"
    assert adapter_of("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") is None
    assert adapter_of("base_model.model.lm_head.lora_B") is None


def test_a_frozen_part_of_a_trained_adapter_stays_frozen_whichever_adapter_is_active(tiny_models, tmp_path):
    """AdapterStack.freeze (PPO's value adapter training its top layer only): the frozen part of a trainable adapter
    keeps requires_grad False through every switch of the active adapter (set_adapter re-enables the active one's
    tensors), and nothing else is frozen. Mutant: the switch restored every trainable adapter's tensors whole."""
    import yaml

    from pipeline.adapters import AdapterStack, adapter_of
    from tests.fake_upstream import _lora_adapter

    spec = yaml.safe_load(tiny_models["llama"].read_text())
    policy = _lora_adapter(spec["name_or_path"], spec["lora_target_modules"], tmp_path / "policy", seed=1)
    value = _lora_adapter(spec["name_or_path"], spec["lora_target_modules"], tmp_path / "value", seed=2,
                          task_type="SEQ_CLS")
    prof = profile_from(str(tiny_models["llama"]))
    stack = AdapterStack.build(prof, load_tokenizer(prof), {"policy": policy, "value": value},
                               trainable=("policy", "value"))
    stack.freeze("value", [stack.causal_lm.model.layers[0]])
    adapter_tensors = [n for n, _ in stack.model.named_parameters() if adapter_of(n) is not None]
    frozen = {n for n in adapter_tensors if adapter_of(n) == "value" and ".layers.0." in n}
    assert frozen and len(frozen) < sum(adapter_of(n) == "value" for n in adapter_tensors)
    for active in ("policy", "value", "policy", "value"):
        stack.use(active)
        assert {n for n, p in stack.model.named_parameters() if adapter_of(n) is not None and not p.requires_grad} \
            == frozen, active


def test_a_bf16_stack_scores_with_its_fp32_head_as_built(tiny_models_bf16, tmp_path):
    """On a bf16 base the stack's score heads are fp32 (its slot), and eval scores with them as AdapterStack.build
    leaves them (PPO adds fp32_head's cast; eval does not): head_output casts the bf16 hidden state up to the head's
    dtype and scores in fp32. Mutant: the hidden state handed to the head as it is (a dtype error in eval)."""
    import yaml

    from pipeline.adapters import AdapterStack
    from tests.fake_upstream import _lora_adapter

    spec = yaml.safe_load(tiny_models_bf16["llama"].read_text())
    reward = _lora_adapter(spec["name_or_path"], spec["lora_target_modules"], tmp_path / "reward", seed=3,
                           task_type="SEQ_CLS")
    prof = profile_from(str(tiny_models_bf16["llama"]))
    stack = AdapterStack.build(prof, load_tokenizer(prof), {"reward": reward})
    ids, mask = torch.randint(5, 60, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    with torch.no_grad():
        hidden = stack.hidden("reward", ids, mask)
        assert hidden.dtype == torch.bfloat16 and next(stack.causal_lm.score.parameters()).dtype == torch.float32
        values = stack.values("reward", ids, mask)
        by_hand = stack.causal_lm.score(hidden.float()).squeeze(-1)
    assert values.dtype == torch.float32 and torch.equal(values, by_hand)


def test_an_ensemble_trains_each_member_with_its_own_seed(tiny_models, marker_data, tmp_path, capsys):
    """`ensemble: 2`: member 0 is exactly the reward model of `ensemble: 1` (same seed, same pairs), member 1 another
    one (its own seed, stream_seed(42, 1)) on the same held-out prompts; the stage's held-out figures are those of the
    mean of the members' standardised scores, as PPO's adapter stack computes it from the saved adapters."""
    from safetensors.torch import load_file

    from pipeline.adapters import AdapterStack, reward_members
    from stages.rm_scoring import heldout_metrics

    runs_dir, arch = tmp_path / "runs", "qwen2"
    extra = ("--dataset_name", str(marker_data["conversational"]), "--max_steps", "6", "--evals", "1")
    for run, n in (("one", "1"), ("two", "2")):
        fake_sft(tiny_models[arch], runs_dir, run)
        main(*parse_args(rm_args(tiny_models[arch], runs_dir, run, *extra, "--ensemble", n)))
    assert "reward model 2 of 2 (seed 1000045)" in capsys.readouterr().out
    one = json.loads((runs_dir / "one" / "rm" / "manifest.json").read_text())
    two = json.loads((runs_dir / "two" / "rm" / "manifest.json").read_text())
    members, stats = reward_members(two)
    assert list(members) == ["reward", "reward-1"] and two["metrics"]["ensemble"] == 2
    assert [r["seed"] for r in two["metrics"]["members"]] == [42, 1_000_045]
    first, second, single = (load_file(f"{d}/adapter_model.safetensors")
                             for d in (members["reward"], members["reward-1"], one["outputs"]["adapter"]))
    assert all(torch.equal(first[k], single[k]) for k in single)
    assert any(not torch.equal(first[k], second[k]) for k in first)
    assert two["metrics"]["members"][0]["eval_accuracy"] == one["metrics"]["eval_accuracy"]
    assert all(r["reload_check"]["max_abs_diff"] <= 1e-4 for r in two["metrics"]["members"])
    assert (runs_dir / "two" / "rm" / "member-1" / "adapter" / "pipeline_base.json").is_file()
    # each member's own LoRA config: one shared config object grew peft's modules_to_save with every member
    configs = [json.loads((Path(members[m]) / "adapter_config.json").read_text()) for m in ("reward", "reward-1")]
    assert configs[0] == configs[1] and len(set(configs[1]["modules_to_save"])) == len(configs[1]["modules_to_save"])

    prof = profile_from(str(tiny_models[arch]))
    tok = load_tokenizer(prof)
    rows = [json.loads(line) for line in open(runs_dir / "two" / "rm" / "eval_pairs.jsonl")]
    assert rows == [json.loads(line) for line in open(runs_dir / "one" / "rm" / "eval_pairs.jsonl")]
    seqs = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    sft = runs_dir / "two" / "sft" / "adapter"
    stack = AdapterStack.build(prof, tok, {"policy": sft, **members})
    starts = torch.tensor([r["reply_start"] for r in rows] * 2)  # the replies' sums (configs/rm.yaml: pooling sum)
    with torch.no_grad():
        each = [stack.scores(name, ids, mask, starts) for name in members]
        stack.add_ensemble("reward", list(members), stats)
        joint = stack.scores("reward", ids, mask, starts)
    by_hand = ((each[0] - stats[0][0]) / stats[0][1] + (each[1] - stats[1][0]) / stats[1][1]) / 2
    torch.testing.assert_close(joint, by_hand)
    n, m = len(rows), two["metrics"]
    rows = [dict(r, full_lengths=(1, 1)) for r in rows]  # "longer wins" is not what this compares
    want = heldout_metrics(rows, by_hand[:n].tolist(), by_hand[n:].tolist())
    assert m["eval_accuracy"] == want["eval_accuracy"]
    assert m["reward_mean"] == pytest.approx(want["reward_mean"], abs=2e-4)
    assert m["reward_std"] == pytest.approx(want["reward_std"], abs=2e-4)
    for row, scores in zip(m["members"], each):  # each member's own statistics, which standardise it
        assert row["reward_std"] == pytest.approx(heldout_metrics(rows, scores[:n].tolist(), scores[n:].tolist())["reward_std"], abs=2e-4)


# ---------------------------------------------------------------- score pooling

def test_an_empty_sequence_scores_zero_without_a_forward(tiny_models):
    """The empty prompt of a plain-text pair (no prompt, no BOS) that `sum` pooling subtracts sums over nothing: 0,
    without a forward, and the other sequences of its batch score as they do alone. Mutant: the empty sequence
    batched, an all-pad row whose head output at position 0 became its score."""
    from stages.rm_scoring import score

    prof = profile_from(str(tiny_models["llama"]))
    tok = load_tokenizer(prof)
    torch.manual_seed(0)
    model = load_base(prof, tok, kind="score")
    seq = tok("a short reply")["input_ids"]
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([seq])).logits[0, 0].item()
    assert score(model, [[], seq], tok.pad_token_id, batch_size=2) == [0.0, pytest.approx(alone, abs=1e-6)]
    assert score(model, [[]], tok.pad_token_id) == [0.0]


def test_pool_scores_by_hand(tmp_path):
    """'last': the head at the last real token; 'sum': the head summed over the real tokens up to it, / 16. Right
    padding, left padding, and pad == eos (the final EOS is not read, as transformers reads it; one inside counts)."""
    per_token = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0],
                              [1.0, 2.0, 3.0, 4.0, 5.0],
                              [1.0, 2.0, 3.0, 4.0, 5.0]])
    pad = 0
    ids = torch.tensor([[7, 8, 9, pad, pad],    # right-padded: tokens 0-2
                        [pad, pad, 7, 8, 9],    # left-padded: tokens 2-4
                        [7, pad, 8, 9, pad]])   # pad == eos: one inside (masked in), the final one (masked in)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert pool_scores(per_token, ids, mask, pad, "last").tolist() == [3.0, 5.0, 4.0]
    assert SUM_DIVISOR == 16.0
    assert pool_scores(per_token, ids, mask, pad, "sum").tolist() == [6 / 16, 12 / 16, 10 / 16]
    starts = torch.tensor([1, 3, 2])  # the replies: tokens 1-2, 3-4, 2-3
    assert pool_scores(per_token, ids, mask, pad, "sum", starts).tolist() == [5 / 16, 9 / 16, 7 / 16]
    assert pool_scores(per_token, ids, mask, pad, "last", starts).tolist() == [3.0, 5.0, 4.0]  # starts: sum only
    prompt_ids, prompt_mask = prompt_part(ids[[0, 2]], mask[[0, 2]], starts[[0, 2]], pad)  # right-padded rows
    assert prompt_ids.tolist() == [[7, pad], [7, pad]] and prompt_mask.tolist() == [[1, 0], [1, 1]]
    # plain-text pairs without a prompt: no prompt tokens, one masked column (a forward of width 0 fails)
    prompt_ids, prompt_mask = prompt_part(ids[[0, 2]], mask[[0, 2]], torch.tensor([0, 0]), pad)
    assert prompt_ids.tolist() == [[pad], [pad]] and prompt_mask.tolist() == [[0], [0]]
    with pytest.raises(ValueError, match="unknown score pooling 'mean'"):
        pool_scores(per_token, ids, mask, pad, "mean")
    with pytest.raises(ValueError, match="unknown score pooling 'mean'"):  # its in-forward twin, before any hook
        pool_in_forward(torch.nn.Linear(2, 1), "mean")
    assert read_pooling(tmp_path) == "last"  # no score_pooling.json: a stock reward model
    write_pooling(tmp_path, "sum")
    assert read_pooling(tmp_path) == "sum" and json.loads((tmp_path / "score_pooling.json").read_text())["sum_divisor"] == 16
    (tmp_path / "score_pooling.json").write_text('{"pooling": "max"}')
    with pytest.raises(ConfigError, match="score_pooling.json: pooling 'max'"):
        read_pooling(tmp_path)


def test_a_last_pooled_reward_models_pooling_file_gives_no_divisor(tmp_path):
    """score_pooling.json is written beside every reward adapter and published with it: for `last` pooling it gives
    no sum_divisor (the score is the head at the last token, divided by nothing); for `sum`, SUM_DIVISOR. Mutant: the
    divisor written whatever the pooling, and a `last` model's file told its users to divide its score by 16."""
    from pipeline.adapters import read_sum_divisor

    write_pooling(tmp_path, "last")
    written = json.loads((tmp_path / "score_pooling.json").read_text())
    assert (written["pooling"], written["sum_divisor"]) == ("last", None)
    assert read_pooling(tmp_path) == "last" and read_sum_divisor(tmp_path) is None
    write_pooling(tmp_path, "sum")
    assert json.loads((tmp_path / "score_pooling.json").read_text())["sum_divisor"] == read_sum_divisor(tmp_path) == 16.0


@pytest.mark.parametrize("arch", ARCHS)
def test_pooled_forward_is_pool_scores(tiny_models, arch):
    """pool_in_forward (what RewardTrainer, the stage's scoring, the reload check and an rm: judge run) gives
    pool_scores over the head's per-token outputs (what PPO's adapter stack and rollout compute), padded on either
    side; 'last' leaves the stock forward as it is."""
    from pipeline.models import backbone, score_head_name

    prof = profile_from(str(tiny_models[arch]))
    tok = load_tokenizer(prof)
    torch.manual_seed(0)
    model = load_base(prof, tok, kind="score").eval()
    pad = model.config.pad_token_id
    ids = torch.randint(5, 60, (3, 9))
    mask = torch.ones_like(ids)
    ids[0, 6:], mask[0, 6:] = pad, 0  # right padding
    ids[1, :3], mask[1, :3] = pad, 0  # left padding
    with torch.no_grad():
        hidden = backbone(model)(input_ids=ids, attention_mask=mask).last_hidden_state
        per_token = getattr(model, score_head_name(model))(hidden)[..., 0]
        stock = model(input_ids=ids, attention_mask=mask).logits[:, 0]
        assert pool_in_forward(model, "last") is model
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits[:, 0], stock)
        torch.testing.assert_close(stock, pool_scores(per_token, ids, mask, pad, "last"), atol=1e-5, rtol=1e-5)
        pool_in_forward(model, "sum")
        summed = model(input_ids=ids, attention_mask=mask).logits[:, 0]
    torch.testing.assert_close(summed, pool_scores(per_token, ids, mask, pad, "sum"), atol=1e-5, rtol=1e-5)
    by_hand = torch.stack([per_token[0, :6].sum(), per_token[1, 3:].sum(), per_token[2].sum()]) / 16
    torch.testing.assert_close(summed, by_hand, atol=1e-5, rtol=1e-5)
    # the reply's sum from a stock forward: the whole row's score less its first `starts` tokens' (right padding)
    starts = torch.tensor([2, 4])
    rows = ids[[0, 2]], mask[[0, 2]]
    with torch.no_grad():
        whole = model(input_ids=rows[0], attention_mask=rows[1]).logits[:, 0]
        prompt_ids, prompt_mask = prompt_part(*rows, starts, pad)
        reply = whole - model(input_ids=prompt_ids, attention_mask=prompt_mask).logits[:, 0]
    torch.testing.assert_close(reply, pool_scores(per_token[[0, 2]], *rows, pad, "sum", starts), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reply, torch.stack([per_token[0, 2:6].sum(), per_token[2, 4:].sum()]) / 16,
                               atol=1e-5, rtol=1e-5)


def test_a_pooled_forward_without_a_mask_sums_every_token(tiny_models):
    """pool_in_forward's sum when the caller gives no attention_mask (a user's `model(input_ids=...)` on the published
    reward model, rows without padding): every token counts, as the unmasked forward attends to them all. Mutant: a
    missing mask taken as all zeros, and every such score was 0."""
    from pipeline.models import backbone, score_head_name

    prof = profile_from(str(tiny_models["llama"]))
    tok = load_tokenizer(prof)
    torch.manual_seed(0)
    model = load_base(prof, tok, kind="score").eval()
    ids = torch.randint(5, 60, (2, 7))
    ids[ids == model.config.pad_token_id] = 4  # no pad inside: the last token is the one read
    with torch.no_grad():
        hidden = backbone(model)(input_ids=ids).last_hidden_state
        per_token = getattr(model, score_head_name(model))(hidden)[..., 0]
        pool_in_forward(model, "sum")
        summed = model(input_ids=ids).logits[:, 0]
    assert per_token.abs().sum() > 0
    torch.testing.assert_close(summed, per_token.sum(1) / SUM_DIVISOR, atol=1e-5, rtol=1e-5)


def test_reply_start_is_where_ppo_and_eval_start_a_summed_reply(tiny_models):
    """A summing reward model trains on the tokens after the prompt and its generation prompt: reply_start on the
    stage's token ids equals the start chat_reward_inputs gives PPO and eval for the same prompt and reply. It never
    passes the point where chosen and rejected part."""
    from pipeline.generation import chat_ids, chat_reward_inputs
    from stages.rm_data import reply_start

    tok = load_tokenizer(profile_from(str(tiny_models["llama"])))
    for row in marker_rows(3):
        chosen, rejected = encode_pair(tok, row)
        text = row["chosen"][0]["content"]
        assert reply_start(tok, row, chosen, rejected) == int(chat_reward_inputs(tok, [row["prompt"]], [text])[2][0])
        with_header = chat_ids(tok, row["prompt"], add_generation_prompt=True)
        assert reply_start(tok, row, chosen, rejected) == len(with_header) > len(chat_ids(tok, row["prompt"]))
    prompt_ids = chat_ids(tok, marker_rows(1)[0]["prompt"], add_generation_prompt=True)
    assert reply_start(tok, marker_rows(1)[0], prompt_ids + [7, 8], prompt_ids[:3] + [9, 9]) == 3


def test_label_strength_margin_and_ties_by_hand(tmp_path):
    """Llama 2's margin: margin_scale x strength, from the label's first word ("much better" 1, "slightly better" 1/3,
    a number as is); an exported tie keeps its flag; without margin_scale the margin is 0."""
    rows = [dict(r, strength=s) for r, s in zip(marker_rows(4), ["much better", "slightly better", 0.5, ""])]
    rows[3]["is_tie"] = True
    path = write_jsonl(tmp_path / "strength.jsonl", rows)
    pairs, _, _, _ = load_pairs(RMArgs(dataset_name=str(path), margin_scale=3.0), None, 0)
    assert [round(p["margin"], 6) for p in pairs] == [3.0, 1.0, 1.5, 0.0]
    assert [p["tie"] for p in pairs] == [False, False, False, True]
    pairs, _, _, _ = load_pairs(RMArgs(dataset_name=str(path)), None, 0)
    assert [p["margin"] for p in pairs] == [0.0] * 4
    # a column no file has (`strenght`) gave every pair a margin of 0 under margin_scale 3, with no word
    for args in (RMArgs(dataset_name=str(path), margin_scale=3.0, margin_column="strenght"),
                 RMArgs(dataset_mixture={str(path): {}}, margin_scale=3.0, margin_column="strenght")):
        with pytest.raises(ConfigError, match="margin_scale 3 reads the label strength from the column 'strenght', "
                                              "which .* do not have: set --margin_column"):
            load_pairs(args, None, 0)
    assert len(load_pairs(RMArgs(dataset_name=str(path), margin_column="strenght"), None, 0)[0]) == 4  # scale 0: unread


@pytest.mark.parametrize("by_prompt", ["false", "true"])
def test_label_strength_is_the_margin_the_training_loss_subtracts(tiny_models, tmp_path, by_prompt):
    """Llama 2's margin loss, -log sigmoid(r_chosen - r_rejected - margin), in pairwise batches and in batches by
    prompt. One pair a batch, the first step's loss (logged before any update): without margin_scale it is
    softplus(-d), which gives d; the same run (same seed, same first pair) with every pair "much better" and
    margin_scale 3 must log softplus(3 - d)."""
    import math

    runs_dir = tmp_path / "runs"
    fake_sft(tiny_models["llama"], runs_dir, "t")
    data = write_jsonl(tmp_path / "much.jsonl", [dict(r, strength="much better") for r in marker_rows(10)])
    first = {}
    for scale in ("0", "3"):
        m = main(*parse_args(rm_args(tiny_models["llama"], runs_dir, "t", "--dataset_name", str(data), "--margin_scale",
                                     scale, "--batch_by_prompt", by_prompt, "--per_device_train_batch_size", "1",
                                     "--max_steps", "1", "--evals", "1", "--logging_steps", "1")))
        first[scale] = m["loss_curve"][0]
    d = -math.log(math.expm1(first["0"]))  # softplus(-d) = log(1 + e^-d)
    assert first["3"] == pytest.approx(math.log1p(math.exp(3 - d)), abs=1e-5)  # seen: 1.6e-7 (float32 of a loss ~3)


def test_held_out_pairs_leave_ties_out_and_text_keeps_one_eos(tiny_models, tmp_path):
    """A tie (exported in both orders) trains the rewards together but has no right answer to score: it never counts
    in the held-out accuracy. A plain-text reply that already ends in EOS gets no second one. A source's max_rows
    keeps exactly that many pairs, a sample drawn by the seed rather than the file's first rows."""
    tok = load_tokenizer(profile_from(str(tiny_models["llama"])))
    rows = [dict(r, is_tie=(i % 2 == 0)) for i, r in enumerate(marker_rows(40))]
    train_cfg, args, _ = parse_args(["--config", str(REPO / "configs/rm.yaml"), "--dataset_name",
                                     str(write_jsonl(tmp_path / "ties.jsonl", rows)), "--eval_fraction", "0.5"])
    train_rows, eval_rows, _, _ = prepare_data(args, train_cfg, None, tok)
    assert eval_rows and not any(r["tie"] for r in eval_rows) and any(r["tie"] for r in train_rows)
    c, _ = encode_pair(tok, {"prompt": "Q: hi.", "chosen": " yes" + tok.eos_token, "rejected": " no"})
    assert c[-1] == tok.eos_token_id and c.count(tok.eos_token_id) == 1
    mixture = json.dumps({str(write_jsonl(tmp_path / "m.jsonl", marker_rows(9))): {"max_rows": 4}})
    kept = [[p["prompt"] for p in load_pairs(RMArgs(dataset_mixture=mixture), StageRun("rm", "mix", str(tmp_path / "runs")),
                                             seed)[0]] for seed in range(4)]
    assert all(len(k) == 4 for k in kept)
    # a random sample fixed by the seed, not the file's first rows (a file sorted by topic or date would be cut to one)
    first = [r["prompt"] for r in marker_rows(9)[:4]]
    assert any(k != first for k in kept) and len({json.dumps(k) for k in kept}) > 1


def test_the_held_out_pairs_are_the_eval_fraction_of_the_prompts(tiny_models, tmp_path):
    """prepare_data holds out round(prompts x eval_fraction) whole prompts and trains on the rest: 8 prompts of one
    pair each at 0.25 give 2 held-out pairs and 6 training pairs, on no shared prompt. Mutant: the halves swapped (6
    held out, 2 trained on), which an eval_fraction of 0.5 cannot tell apart."""
    tok = load_tokenizer(profile_from(str(tiny_models["llama"])))
    data = write_jsonl(tmp_path / "eight.jsonl", marker_rows(8))
    train_cfg, args, _ = parse_args(["--config", str(REPO / "configs/rm.yaml"), "--dataset_name", str(data),
                                     "--eval_fraction", "0.25"])
    train_rows, eval_rows, counts, _ = prepare_data(args, train_cfg, None, tok)
    assert (len(train_rows), len(eval_rows)) == (6, 2) and (counts["eight"]["train"], counts["eight"]["eval"]) == (6, 2)
    train_prompts, eval_prompts = ({json.dumps(r["prompt"]) for r in rows} for rows in (train_rows, eval_rows))
    assert len(train_prompts | eval_prompts) == 8 and not train_prompts & eval_prompts


def test_split_keys_are_conversations_and_an_implicit_prompts_pairs_share_one():
    """The held-out split's keys, by hand: a one-turn prompt's key is its prompt_key (the default run's split is
    unchanged); a later turn of a conversation shares its first turn's key (OASST's trees); the pairs of one HH-style
    plain-text prompt (no prompt column: TRL's shared start takes in the words both replies begin with) share one key,
    with a later turn of theirs, and another question keeps its own. Mutants: the prompt's key for a messages prompt;
    the implicit prompts not cut at their last line break; a key not taken in by the key it starts with."""
    from stages.rm_data import prompt_key, split_keys

    q1 = [{"role": "user", "content": "Name a fruit."}]
    q1_turn2 = q1 + [{"role": "assistant", "content": "A pear."}, {"role": "user", "content": "Another?"}]
    one_turn = [{"prompt": q1}, {"prompt": [{"role": "system", "content": "Be brief."}, *q1]}, {"prompt": "Once upon"}]
    assert split_keys(one_turn) == [prompt_key(r, i) for i, r in enumerate(one_turn)]
    keys = split_keys([{"prompt": q1}, {"prompt": q1_turn2}, {"prompt": [{"role": "user", "content": "Name a tree."}]}])
    assert keys[0] == keys[1] != keys[2]
    hh = "\n\nHuman: What is 2+2?\n\nAssistant:"
    implicit = [{"prompt": hh + " The answer is f", "implicit_prompt": True},   # "...four" vs "...five"
                {"prompt": hh, "implicit_prompt": True},                        # "Four." vs "It is five."
                {"prompt": hh + " It", "implicit_prompt": True},                # "It is four." vs "It's five."
                {"prompt": hh + " Four.\n\nHuman: Sure?\n\nAssistant:", "implicit_prompt": True},  # a second turn
                {"prompt": "\n\nHuman: What is 3+3?\n\nAssistant: Six", "implicit_prompt": True},
                {"prompt": "\nA lone break first", "implicit_prompt": True}]  # cut to "\n" it would take in all
    keys = split_keys(implicit)
    assert len(set(keys[:4])) == 1 and len(set(keys)) == 3
    assert len({prompt_key(r, i) for i, r in enumerate(implicit)}) == 6  # by prompt: four keys for one question
    # no pair's prompt is the bare question, so no key starts another: the cut at the last line break joins them
    assert len(set(split_keys([implicit[0], implicit[2]]))) == 1


def test_no_conversation_has_pairs_on_both_sides_of_the_held_out_split(tiny_models, tmp_path):
    """prepare_data on 20 conversations, each with a first-turn pair and a second-turn pair whose prompt continues the
    first turn's chosen reply, and 20 HH-style questions in plain text with three pairs each whose replies start
    otherwise: every conversation's pairs land on one side (by prompt, most would be split)."""
    from stages.rm_data import prepare_data

    tok = load_tokenizer(profile_from(str(tiny_models["llama"])))
    rows = []
    for i in range(20):
        q = [{"role": "user", "content": f"Tell me about the number {i}."}]
        rows.append({"prompt": q, "chosen": [{"role": "assistant", "content": f"It is {i} banana"}],
                     "rejected": [{"role": "assistant", "content": f"No {i} window"}]})
        rows.append({"prompt": q + [{"role": "assistant", "content": f"It is {i} banana"},
                                    {"role": "user", "content": "And then?"}],
                     "chosen": [{"role": "assistant", "content": "More banana"}],
                     "rejected": [{"role": "assistant", "content": "More window"}]})
        hh = f"\n\nHuman: What comes after {i}?\n\nAssistant:"
        for good, bad in ((" The answer is banana", " The answer is window"), (" Banana", " Window"),
                          (" It is banana", " It was window")):
            rows.append({"chosen": hh + good, "rejected": hh + bad})
    data = write_jsonl(tmp_path / "trees.jsonl", rows)
    train_cfg, args, _ = parse_args(["--config", str(REPO / "configs/rm.yaml"), "--dataset_name", str(data),
                                     "--eval_fraction", "0.25"])
    train_rows, eval_rows, _, _ = prepare_data(args, train_cfg, None, tok)

    def question(r):  # which of the 40 conversations a pair belongs to
        text = r["prompt"][0]["content"] if isinstance(r["prompt"], list) else r["prompt"].split("?")[0]
        return ("tree" if isinstance(r["prompt"], list) else "hh", int("".join(c for c in text if c.isdigit())))

    train_q, eval_q = ({question(r) for r in rows} for rows in (train_rows, eval_rows))
    assert not train_q & eval_q and len(train_q | eval_q) == 40
    assert 5 <= len(eval_q) <= 15 and len(train_rows) + len(eval_rows) == 100


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["ddp", "fsdp"])
def test_two_processes_resume_an_interrupted_ensemble_and_end_as_an_uninterrupted_one(launch, tiny_models, marker_data,
                                                                                       tmp_path):
    """resume == no resume under DDP and on a base sharded by FSDP2: an ensemble of two on two processes, killed in
    its second member's step 7 (tests/killed_stage.py; 4 steps an epoch: inside the second epoch, whose order
    group_by_length draws from seed + epoch), then the same command again, ends with the uninterrupted two-process
    run's adapters, to the bit, and its held-out figures."""
    from safetensors.torch import load_file

    runs_dir = tmp_path / "runs"
    data = write_jsonl(tmp_path / "marker40.jsonl", marker_rows(40))
    extra = ("--dataset_name", str(data), "--max_steps", "8", "--evals", "4", "--ensemble", "2",
             "--per_device_train_batch_size", "4")
    for run in ("whole", "cut"):
        fake_sft(tiny_models["llama"], runs_dir, run)
    two = {"fsdp": True} if launch == "fsdp" else {"processes": 2}
    whole = run_module("stages.rm", rm_args(tiny_models["llama"], runs_dir, "whole", *extra), timeout=300, **two)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = run_module("tests.killed_stage", ["stages.rm", "member-1:7", *rm_args(tiny_models["llama"], runs_dir, "cut", *extra)],
                        timeout=300, **two)
    assert killed.returncode != 0 and "killed at step 7" in killed.stderr, killed.stderr[-3000:]
    resumed = run_module("stages.rm", rm_args(tiny_models["llama"], runs_dir, "cut", *extra), timeout=300, **two)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    m_whole, m_cut = (json.loads((runs_dir / r / "rm" / "manifest.json").read_text())["metrics"] for r in ("whole", "cut"))
    assert m_whole["world_size"] == m_cut["world_size"] == 2
    assert {m_whole["sharding"]["engine"], m_cut["sharding"]["engine"]} == {"fsdp2" if launch == "fsdp" else "none"}
    assert m_whole["plan_steps_per_epoch"] == 4 and [r["resumed_from_step"] for r in m_cut["members"]][1] == 6
    assert resumed.stderr.count(f"note: resuming from {runs_dir / 'cut' / 'rm' / 'trainer' / 'member-1' / 'checkpoint-6'}") == 1
    for key in ("eval_accuracy", "eval_loss", "reward_mean", "reward_std", "best_step"):
        assert [r[key] for r in m_cut["members"]] == [r[key] for r in m_whole["members"]], key
    for member in ("adapter", "member-1/adapter"):
        a, b = (load_file(runs_dir / run / "rm" / member / "adapter_model.safetensors") for run in ("whole", "cut"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), member


@pytest.mark.parametrize("batch_by_prompt", ["true", "false"])
def test_a_run_resumed_inside_its_second_epoch_ends_as_an_uninterrupted_one(batch_by_prompt, tiny_models, tmp_path,
                                                                               monkeypatch):
    """group_by_length (configs/rm.yaml) draws each epoch's order from seed + epoch: transformers' sampler drew it from
    the global RNG, so a run resumed inside epoch 1 (4 steps an epoch, killed at step 7, resumed from step 6) took
    epoch 0's order again and ended 5e-3 away from the uninterrupted run. Its loss curve and train_loss are the
    uninterrupted run's too: logging_steps 4 becomes 2, the checkpoints' interval (a resumed run logged steps 7-8
    where the whole run logged 5-8), and train_loss is over all 8 steps, not the 2 after the resume."""
    from safetensors.torch import load_file
    from transformers.trainer_callback import CallbackHandler

    runs_dir, data = tmp_path / "runs", write_jsonl(tmp_path / "marker40.jsonl", marker_rows(40))
    extra = ("--dataset_name", str(data), "--max_steps", "8", "--evals", "4", "--ensemble", "1",
             "--per_device_train_batch_size", "8", "--batch_by_prompt", batch_by_prompt)
    original = CallbackHandler.on_step_end

    def killed_at_step_7(self, train_args, state, control):
        if kill and state.global_step == 7:
            raise RuntimeError("killed at step 7")
        return original(self, train_args, state, control)

    monkeypatch.setattr(CallbackHandler, "on_step_end", killed_at_step_7)
    for run in ("whole", "cut"):
        fake_sft(tiny_models["llama"], runs_dir, run)
    kill = False
    whole = main(*parse_args(rm_args(tiny_models["llama"], runs_dir, "whole", *extra)))
    kill = True
    with pytest.raises(RuntimeError, match="killed at step 7"):
        main(*parse_args(rm_args(tiny_models["llama"], runs_dir, "cut", *extra)))
    kill = False
    cut = main(*parse_args(rm_args(tiny_models["llama"], runs_dir, "cut", *extra)))
    assert whole["plan_steps_per_epoch"] == 4 and cut["members"][0]["resumed_from_step"] == 6
    assert cut["loss_curve"] == whole["loss_curve"] and len(whole["loss_curve"]) == 4
    assert cut["train_loss"] == whole["train_loss"]  # the same losses summed in the same order: equal
    a, b = (load_file(runs_dir / run / "rm" / "adapter" / "adapter_model.safetensors") for run in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_interrupted_reward_model_run_resumes_each_member_and_ends_as_an_uninterrupted_one(
        tiny_models, marker_data, tmp_path, monkeypatch, capsys):
    """resume == no resume, for an ensemble of two killed in its second member's step 5 (after its step-4
    checkpoint): the same command again takes the first member from its newest checkpoint before its last step (a
    resume at the last step would train a step too many) and the second from step 4, and ends with the uninterrupted
    run's adapters and held-out figures."""
    from safetensors.torch import load_file
    from transformers.trainer_callback import CallbackHandler

    runs_dir, arch = tmp_path / "runs", "llama"
    extra = ("--dataset_name", str(marker_data["conversational"]), "--max_steps", "8", "--evals", "4",
             "--ensemble", "2")
    original, steps_run = CallbackHandler.on_step_end, []

    def killed_in_member_1(self, train_args, state, control):
        steps_run.append((Path(train_args.output_dir).name, state.global_step))
        if kill and train_args.output_dir.endswith("member-1") and state.global_step == 5:
            raise RuntimeError("killed in member 1 at step 5")
        return original(self, train_args, state, control)

    monkeypatch.setattr(CallbackHandler, "on_step_end", killed_in_member_1)
    for run in ("whole", "cut"):
        fake_sft(tiny_models[arch], runs_dir, run)
    kill = False
    whole = main(*parse_args(rm_args(tiny_models[arch], runs_dir, "whole", *extra)))
    kill = True
    with pytest.raises(RuntimeError, match="killed in member 1"):
        main(*parse_args(rm_args(tiny_models[arch], runs_dir, "cut", *extra)))
    assert not (runs_dir / "cut" / "rm" / "manifest.json").exists()
    kill, steps_run[:] = False, []
    capsys.readouterr()
    cut = main(*parse_args(rm_args(tiny_models[arch], runs_dir, "cut", *extra)))
    assert "note: resuming from" in capsys.readouterr().err
    first, second = (r["resumed_from_step"] for r in cut["members"])
    assert [r["resumed_from_step"] for r in whole["members"]] == [None, None] and second == 4
    # member 0 finished: its checkpoints are the best and the last (save_total_limit 1); it resumes from one before
    # step 8, or starts over when the best is the last, and never trains past step 8
    assert first is None or first < 8
    assert steps_run == [("member-0", s) for s in range((first or 0) + 1, 9)] + [("member-1", s) for s in (5, 6, 7, 8)]
    for key in ("eval_accuracy", "eval_loss", "reward_mean", "reward_std", "best_step"):
        assert [r[key] for r in cut["members"]] == [r[key] for r in whole["members"]], key
    assert cut["eval_curve"] == whole["eval_curve"] and cut["loss_curve"] == whole["loss_curve"]
    for member in ("adapter", "member-1/adapter"):
        a, b = (load_file(runs_dir / run / "rm" / member / "adapter_model.safetensors") for run in ("whole", "cut"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), member
    assert not (runs_dir / "cut" / "rm" / "trainer").exists()


def test_a_crash_after_training_keeps_the_checkpoints_for_the_rerun(tiny_models, marker_data, tmp_path, monkeypatch):
    """The checkpoints were deleted before the reload check and the manifest: a crash there (a killed process, a full
    disk) left neither, and the rerun could resume no member (stages/resume.py resumes from a member's best checkpoint
    before its last step). Now they go once the manifest is written."""
    import stages.rm as rm

    runs_dir = tmp_path / "runs"
    fake_sft(tiny_models["llama"], runs_dir, "r")
    args = rm_args(tiny_models["llama"], runs_dir, "r", "--dataset_name", str(marker_data["conversational"]),
                   "--max_steps", "4", "--evals", "2")
    with monkeypatch.context() as m:
        m.setattr(rm, "check_reload", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed in the reload check")))
        with pytest.raises(RuntimeError, match="killed in the reload check"):
            main(*parse_args(args))
    trainer = runs_dir / "r" / "rm" / "trainer"
    assert not (runs_dir / "r" / "rm" / "manifest.json").exists() and list(trainer.rglob("checkpoint-*"))
    main(*parse_args(args))
    assert (runs_dir / "r" / "rm" / "manifest.json").is_file() and not trainer.exists()


def test_the_reload_check_allows_for_the_launchs_mixed_precision(tiny_models, tmp_path, monkeypatch):
    """configs/accelerate/multi_gpu.yaml and fsdp.yaml launch with `mixed_precision: bf16`: the stage's held-out
    scores come from bf16 autocast, the reload from the profile's float32. On a GPU (an H200) `make rm` on the tiny
    default stopped there: 0.011 apart, against float32's atol 1e-4. The check compares at bf16's tolerance when the
    launch computed in bf16 (here on the CPU, the same autocast), and says so."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    runs_dir = tmp_path / "runs"
    fake_sft(tiny_models["llama"], runs_dir, "t")
    data = write_jsonl(tmp_path / "marker.jsonl", marker_rows(40))
    metrics = main(*parse_args(rm_args(tiny_models["llama"], runs_dir, "t", "--dataset_name", str(data),
                                       "--max_steps", "4", "--evals", "1")))
    check = metrics["reload_check"]
    assert check["dtype"] == "bfloat16 (mixed precision)" and check["max_abs_diff"] > 1e-4, check


def test_reload_verdict_at_the_launchs_mixed_precision_by_hand():
    """Differences of 0.01-0.02 pass at bf16's tolerance (atol 5e-2, rtol 3e-2) when the stage computed under bf16
    autocast, fail at float32's without it; scores unrelated to the stage's still fail, as a head that was not saved."""
    from stages.rm_scoring import reload_verdict

    close = ([1.0, 2.0, -0.5], [0.5, 0.2, -1.5], [1.01, 2.02, -0.49], [0.49, 0.21, -1.52])
    assert reload_verdict(*close, "float32", False, "bf16")["ok"]
    assert reload_verdict(*close, "float32", False, "bf16")["dtype"] == "bfloat16 (mixed precision)"
    assert not reload_verdict(*close, "float32", False, "no")["ok"]
    assert reload_verdict(*close, "bfloat16", False, "bf16")["dtype"] == "bfloat16"  # the reload's own dtype already
    unrelated = reload_verdict(close[0], close[1], [0.3, -1.0, 0.9], [1.2, 0.4, -0.6], "float32", False, "bf16")
    assert not unrelated["ok"] and "not saved" in unrelated["problem"]


def test_reload_verdict_at_float16_by_hand():
    """float16's tolerance is atol 1e-2, rtol 1e-2: a score 0.0 reloaded as 0.05 is past it (allowed 0.0105), one
    reloaded 0.005 away is within it."""
    from stages.rm_scoring import reload_verdict

    far = reload_verdict([0.0, 2.0], [1.0, 0.5], [0.05, 2.0], [1.0, 0.5], "float16")
    assert not far["ok"] and far["tolerance"] == {"atol": 1e-2, "rtol": 1e-2} and far["dtype"] == "float16"
    assert "more than float16 rounding allows" in far["problem"]
    assert reload_verdict([0.0, 2.0], [1.0, 0.5], [0.005, 2.0], [1.0, 0.5], "float16")["ok"]


def test_an_fp32_head_scores_in_fp32_under_a_launchs_bf16_autocast():
    """fp32_head's promise, under the GPU configs' mixed precision (torch.autocast bf16): the Linear ran in bf16,
    rounding a score of ~0.4 by up to 4e-3. The head's output is the fp32 computation, to the bit, with autocast on or
    off; a bf16 hidden state is cast to the head's dtype first. The same for a peft modules_to_save wrapper's copy."""
    import torch
    from peft.utils import ModulesToSaveWrapper

    from pipeline.adapters import fp32_head

    torch.manual_seed(0)
    hidden = torch.randn(8, 64).to(torch.bfloat16)
    for head in (torch.nn.Linear(64, 1), ModulesToSaveWrapper(torch.nn.Linear(64, 1), "reward")):
        head = fp32_head(head.to(torch.bfloat16))
        active = head.modules_to_save["reward"] if isinstance(head, ModulesToSaveWrapper) else head
        want = torch.nn.functional.linear(hidden.float(), active.weight, active.bias)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = head(hidden)
        assert got.dtype == torch.float32 and torch.equal(got, want)
        assert torch.equal(head(hidden), want)


def test_tidy_keeps_the_logs_and_drops_checkpoints_and_an_earlier_ensembles_members(tmp_path):
    """After the manifest: each member's checkpoints go and its TensorBoard logs stay; member-2 of an earlier
    ensemble of 3 goes when this one has 2; folders left empty go."""
    from stages.rm import tidy

    stage, root = tmp_path / "rm", tmp_path / "rm" / "trainer"
    for path in ("member-0/checkpoint-4/adapter_model.safetensors", "member-0/runs/Dec07/events.out.tfevents.1",
                 "member-1/checkpoint-8/optimizer.pt", "member-1/resume_key.json", "member-1/README.md"):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("x")
    for member in (1, 2):
        (stage / f"member-{member}" / "adapter").mkdir(parents=True)
    tidy(stage, root, members=2)
    assert sorted(str(p.relative_to(stage)) for p in stage.rglob("*")) == [
        "member-1", "member-1/adapter", "trainer", "trainer/member-0", "trainer/member-0/runs",
        "trainer/member-0/runs/Dec07", "trainer/member-0/runs/Dec07/events.out.tfevents.1"]


def test_each_distinct_response_and_prompt_is_rendered_once(tiny_models):
    """A prompt's 3 responses make 3 pairs: EncodedOnce renders 3 prompt + response texts (not 6) and the prompt once
    (not 3), and gives encode_pair's and reply_start's ids."""
    from stages.rm_data import EncodedOnce, encode_pair, reply_start

    tok = load_tokenizer(profile_from(str(tiny_models["llama"])))
    prompt = [{"role": "user", "content": "Tell me about the rabbit."}]
    replies = [[{"role": "assistant", "content": text}] for text in ("It hopped.", "It slept all day.", "No.")]
    pairs = [{"prompt": prompt, "chosen": replies[i], "rejected": replies[j]} for i, j in ((0, 1), (0, 2), (1, 2))]
    calls = []
    render = tok.apply_chat_template
    tok.apply_chat_template = lambda *a, **kw: calls.append(kw.get("add_generation_prompt", False)) or render(*a, **kw)
    encoded = EncodedOnce(tok)
    got = [(encoded.pair(p), encoded.prompt(p["prompt"])) for p in pairs]
    assert calls.count(False) == 3 and calls.count(True) == 1, calls
    tok.apply_chat_template = render
    for p, ((chosen, rejected), prompt_ids) in zip(pairs, got):
        assert (chosen, rejected) == encode_pair(tok, p)
        assert reply_start(tok, p, chosen, rejected, prompt_ids) == reply_start(tok, p, chosen, rejected)


def test_activation_checkpointing_trains_whole_sequences_as_shared_prefixes_would(tiny_models, marker_data, tmp_path,
                                                                                   capsys):
    """transformers drops the KV cache inside a checkpointed layer, so the responses of a shared prefix would run
    without their prompt (it crashed in the first step). With `activation_checkpointing` the batches by prompt run
    whole sequences, say so once, and train what shared prefixes train: the same losses and held-out figures. Given
    on the command line beside it, share_prefix is refused: it would not act."""
    runs_dir = tmp_path / "runs"
    for run in "ab":
        fake_sft(tiny_models["llama"], runs_dir, run)
    args = ["--dataset_name", str(marker_data["conversational"]), "--max_steps", "3", "--evals", "1",
            "--logging_steps", "1"]
    shared = main(*parse_args(rm_args(tiny_models["llama"], runs_dir, "a", *args)))
    assert "whole sequences" not in capsys.readouterr().out
    whole = main(*parse_args(rm_args(tiny_models["llama"], runs_dir, "b", *args, "--activation_checkpointing", "true")))
    assert capsys.readouterr().out.count("note: activation checkpointing drops the cache a shared prefix runs from: "
                                         "whole sequences, not shared prefixes") == 1
    assert len(shared["loss_curve"]) == 3 and whole["loss_curve"] == pytest.approx(shared["loss_curve"], abs=1e-5)
    for key in ("eval_accuracy", "eval_mean_margin", "reward_std"):
        assert whole[key] == pytest.approx(shared[key], abs=1e-5), key
    with pytest.raises(ConfigError, match="--share_prefix on the command line would have no effect: activation "
                                          "checkpointing drops"):
        parse_args(rm_args(tiny_models["llama"], runs_dir, "c", *args, "--activation_checkpointing", "true",
                           "--share_prefix", "true"))
    parse_args(rm_args(tiny_models["llama"], runs_dir, "c", *args, "--activation_checkpointing", "true",
                       "--share_prefix", "false"))  # whole sequences asked for: nothing to refuse
