"""make base: the settings and corpus it cannot run with are refused before the run folder is touched."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError, parse
from tests.conftest import REPO, run_python


def base_args(runs, *extra):
    return ["--config", str(REPO / "configs/base.yaml"), "--runs_dir", str(runs), "--run", "t", *extra]


@pytest.mark.parametrize("extra,message", [
    (["--optimizer", "bogus"], "optimizer must be one of adamw, sgd, rmsprop, not 'bogus'"),
    (["--hidden_size", "100"], "hidden_size 100 must be a multiple of num_attention_heads 6"),
    (["--eval_every", "0"], "eval_every must be at least 1, got 0"),
    (["--max_steps", "-1"], "max_steps must be at least 1, got -1"),  # zero steps: a random base over models/tiny
    (["--text_dir", "{tmp}/nowhere"], "text_dir .*nowhere holds no .txt files"),
    (["--heldout_books", "alice", "zebra"], r"heldout_books \['zebra'\] are not in data/pretrain/texts"),
    (["--heldout_books", *sorted(f.stem for f in (REPO / "data/pretrain/texts").glob("*.txt"))],
     "every book of data/pretrain/texts is held out"),
])
def test_settings_make_base_cannot_run_with_are_one_error_before_writing(extra, message, tmp_path):
    from stages.base import CONFIG_CLASSES, main

    runs = tmp_path / "runs"
    with pytest.raises(ConfigError, match=message):
        main(*parse(CONFIG_CLASSES(), base_args(runs, *[e.format(tmp=tmp_path) for e in extra])))
    assert not runs.exists()


@pytest.mark.parametrize("case", ["not-utf8", "short-heldout", "short-training"])
def test_books_make_base_cannot_read_are_one_error_before_writing(case, tmp_path):
    """A Latin-1 book was a UnicodeDecodeError traceback after the run folder was prepared; a held-out book shorter
    than one block a ZeroDivisionError after 200 training steps."""
    from stages.base import CONFIG_CLASSES, main

    texts, runs = tmp_path / "texts", tmp_path / "runs"
    texts.mkdir()
    (texts / "bunny.txt").write_text((REPO / "data/pretrain/texts/bunny.txt").read_text())
    if case == "not-utf8":
        (texts / "odd.txt").write_bytes("Caf\xe9 au lait.\n".encode("latin-1"))
        held, message = "bunny", r"odd.txt is not UTF-8 text \(invalid continuation byte at line 1, column 4\): save it as UTF-8"
    elif case == "short-heldout":
        (texts / "odd.txt").write_text("A tiny book.\n")
        held, message = "odd", r"the held-out books hold \d+ tokens, less than one block of block_size 64"
    else:  # the long book held out, the tiny one left to train on
        (texts / "odd.txt").write_text("A tiny book.\n")
        held, message = "bunny", r"the training books hold \d+ tokens, less than one block of block_size 64"
    with pytest.raises(ConfigError, match=message):
        main(*parse(CONFIG_CLASSES(), base_args(runs, "--text_dir", str(texts), "--heldout_books", held,
                                                "--block_size", "64", "--vocab_size", "300")))
    assert not runs.exists()


def test_make_base_refusal_is_one_error_line_and_exit_2(tmp_path):
    res = run_python("stages.base", base_args(tmp_path / "runs", "--optimizer", "bogus"), timeout=120)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1 and "Traceback" not in res.stderr and "--optimizer" in errors[0]
    assert not (tmp_path / "runs").exists()


def test_a_tiny_base_trains_on_its_schedule_its_own_books_and_records_its_special_tokens(tmp_path, monkeypatch):
    """The real main() on three small books (one held out) and a 6-step run: the learning rate follows the warmup +
    cosine schedule computed by hand, weight decay applies to matrices only (never to norms), the tokens trained on
    are the training books' alone, and the saved config carries the tokenizer's pad/bos/eos ids (reward models read
    their score at the last token that is not pad_token_id)."""
    import math

    import stages.base as base
    from transformers import AutoConfig, AutoTokenizer

    texts = tmp_path / "texts"
    texts.mkdir()
    for name in ("bunny", "flopsy", "mice"):  # three short Beatrix Potter books
        (texts / f"{name}.txt").write_text((REPO / "data/pretrain/texts" / f"{name}.txt").read_text())
    seen = {}
    real = base.make_optimizer

    def recording(name, groups, lr, weight_decay):
        opt = real(name, groups, lr, weight_decay)
        seen["groups"], seen["lrs"], step = opt.param_groups, [], opt.step

        def recorded_step(*args, **kwargs):
            seen["lrs"].append([g["lr"] for g in opt.param_groups])
            return step(*args, **kwargs)

        opt.step = recorded_step
        return opt

    monkeypatch.setattr(base, "make_optimizer", recording)
    clipped, real_clip = [], torch.nn.utils.clip_grad_norm_

    def clip(params, max_norm, *args, **kwargs):
        clipped.append(max_norm)
        return real_clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    evaluated, real_evaluate = [], base.evaluate

    def recording_evaluate(model, data, batches, batch_size):
        evaluated.append((data, batches, real_evaluate(model, data, batches, batch_size)))
        return evaluated[-1][2]

    monkeypatch.setattr(base, "evaluate", recording_evaluate)
    seeds, real_manual_seed, real_randint = [], torch.manual_seed, torch.randint
    monkeypatch.setattr(torch, "manual_seed", lambda seed: (seeds.append(seed), real_manual_seed(seed))[1])
    drawn_with = set()

    def randint(*args, generator=None, **kwargs):
        drawn_with.add(generator.initial_seed() if generator is not None else None)
        return real_randint(*args, generator=generator, **kwargs)

    monkeypatch.setattr(torch, "randint", randint)
    out = tmp_path / "tiny"
    cfg, run = parse(base.CONFIG_CLASSES(), base_args(
        tmp_path / "runs", "--text_dir", str(texts), "--heldout_books", "mice", "--output_dir", str(out),
        "--vocab_size", "300", "--hidden_size", "16", "--intermediate_size", "32", "--num_hidden_layers", "2",
        "--num_attention_heads", "2", "--block_size", "32", "--batch_size", "2", "--max_steps", "6",
        "--warmup_steps", "2", "--learning_rate", "1e-2", "--min_lr_ratio", "0.1", "--eval_every", "4",
        "--eval_batches", "2", "--seed", "3", "--dropout", "0.25"))
    metrics = base.main(cfg, run)

    c = math.cos(math.pi / 4)  # cosine over steps 2..5: progress 0, 1/4, 2/4, 3/4 of the 4 steps after warmup
    expected = [5e-3, 1e-2, 1e-2, 1e-2 * (0.1 + 0.45 * (1 + c)), 1e-2 * 0.55, 1e-2 * (0.1 + 0.45 * (1 - c))]
    assert [lrs[0] for lrs in seen["lrs"]] == pytest.approx(expected, rel=1e-12)
    assert all(len(set(lrs)) == 1 for lrs in seen["lrs"])  # both groups on the same schedule
    decay, no_decay = seen["groups"]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    # 2 layers x (q, k, v, o, gate, up, down) + embeddings + LM head; 2 layers x 2 norms + the final norm
    assert len(decay["params"]) == 2 * 7 + 2 and all(p.dim() == 2 for p in decay["params"])
    assert len(no_decay["params"]) == 2 * 2 + 1 and all(p.dim() == 1 for p in no_decay["params"])

    tok = AutoTokenizer.from_pretrained(out)
    train_ids = sum(1 + len(tok(base.clean((texts / f"{n}.txt").read_text()), add_special_tokens=False)["input_ids"]) + 1
                    for n in ("bunny", "flopsy"))
    assert metrics["train_tokens_available"] == train_ids  # the held-out book is not trained on
    assert metrics["tokens_seen"] == 6 * 2 * 32
    assert clipped == [1.0] * 6  # grad_clip on every step
    assert [h["step"] for h in metrics["history"]] == [4, 6]  # every eval_every steps, and the last
    assert seeds[0] == 3 and drawn_with == {3}  # the run's seed: the initial weights and the batches drawn
    # held out: the mice book alone, in blocks of block_size + 1; eval_batches during training, all of it at the end
    heldout_rows = (1 + len(tok(base.clean((texts / "mice.txt").read_text()), add_special_tokens=False)["input_ids"])
                    + 1) // 33
    assert [(len(data), batches) for data, batches, _ in evaluated] == [(heldout_rows, 2)] * 2 + [
        (heldout_rows, heldout_rows)]
    assert metrics["heldout_loss"] == round(evaluated[-1][2], 4)
    assert metrics["heldout_perplexity"] == round(math.exp(evaluated[-1][2]), 2)
    config = AutoConfig.from_pretrained(out)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (
        tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)  # <pad>, <s>, </s>: SPECIAL_TOKENS' order
    assert (config.num_attention_heads, config.num_key_value_heads, config.attention_dropout) == (2, 2, 0.25)
    # its own model card: the license `make publish` gives the adapters trained on it, and this run's figures
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert card.data.license == "apache-2.0"
    assert f"Held-out perplexity {metrics['heldout_perplexity']} on mice." in card.text
    assert f"{6 * 2 * 32:,} tokens; seed 3" in card.text


def tiny_base_args(tmp_path, out):
    texts = tmp_path / "texts"
    texts.mkdir(exist_ok=True)
    for name in ("bunny", "mice"):
        (texts / f"{name}.txt").write_text((REPO / "data/pretrain/texts" / f"{name}.txt").read_text())
    return base_args(tmp_path / "runs", "--text_dir", str(texts), "--heldout_books", "mice", "--output_dir", str(out),
                     "--vocab_size", "300", "--hidden_size", "16", "--intermediate_size", "32",
                     "--num_hidden_layers", "1", "--num_attention_heads", "2", "--block_size", "32", "--batch_size",
                     "2", "--max_steps", "2", "--warmup_steps", "1", "--eval_every", "2", "--eval_batches", "1")


def test_a_new_base_replaces_the_old_whole_and_a_save_that_fails_midway_leaves_the_old(tmp_path, monkeypatch):
    """make base wrote its files into models/tiny/ one by one: a kill midway left the committed base half old, half
    new. It now writes beside it and swaps the folder in whole (no file of the old base left beside the new)."""
    import stages.base as base

    out = tmp_path / "tiny"
    out.mkdir()
    old = {"training_report.json": "{}", "model.safetensors": "old weights", "stale.txt": "old"}
    for name, text in old.items():
        (out / name).write_text(text)
    real_card = base.model_card
    monkeypatch.setattr(base, "model_card", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))  # killed at the card
    with pytest.raises(KeyboardInterrupt):
        base.main(*parse(base.CONFIG_CLASSES(), tiny_base_args(tmp_path, out)))
    assert {p.name: p.read_text() for p in out.iterdir()} == old
    monkeypatch.setattr(base, "model_card", real_card)
    base.main(*parse(base.CONFIG_CLASSES(), tiny_base_args(tmp_path, out)))
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json", "README.md"}
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").read_bytes() != b"old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "texts", "tiny"]  # no .tiny.saving / .tiny.old


@pytest.mark.parametrize("kind", ["foreign-folder", "file"])
def test_an_output_dir_that_is_not_a_base_is_refused_before_writing(kind, tmp_path):
    """The new base replaces output_dir whole: a folder of other files (no training_report.json), or a file, is
    refused before the run folder is touched, and left as it was."""
    from stages.base import CONFIG_CLASSES, main

    out = tmp_path / "mine"
    if kind == "file":
        out.write_text("notes")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    message = "is a file" if kind == "file" else "holds files that are not a base make base wrote"
    with pytest.raises(ConfigError, match=message):
        main(*parse(CONFIG_CLASSES(), tiny_base_args(tmp_path, out)))
    assert not (tmp_path / "runs").exists()
    assert (out.read_text() if kind == "file" else (out / "notes.txt").read_text()) in ("notes", "mine")


def test_held_out_loss_is_the_mean_over_its_batches_the_last_short_one_too():
    """evaluate() averages the batches' losses (not their sum), the last short batch included: 5 rows in batches of
    2 are three batches; a stand-in model whose loss is its batch's row count gives (2 + 2 + 1) / 3."""
    from types import SimpleNamespace

    from stages.base import evaluate

    class RowCount(torch.nn.Module):
        def forward(self, input_ids, labels):
            return SimpleNamespace(loss=torch.tensor(float(input_ids.shape[0])))

    assert evaluate(RowCount(), torch.zeros(5, 9, dtype=torch.long), batches=10, batch_size=2) == pytest.approx(5 / 3)


def test_each_optimizer_is_built_with_its_own_settings():
    """nanoGPT's AdamW (beta2 0.95, not torch's 0.999) with the configured weight decay; SGD with momentum 0.9."""
    from stages.base import make_optimizer

    params = [torch.nn.Parameter(torch.zeros(2))]
    adamw = make_optimizer("adamw", params, 3e-3, 0.1)
    assert type(adamw) is torch.optim.AdamW and (adamw.defaults["betas"], adamw.defaults["weight_decay"]) == ((0.9, 0.95), 0.1)
    sgd = make_optimizer("sgd", params, 0.5, 0.0)
    assert type(sgd) is torch.optim.SGD and (sgd.defaults["lr"], sgd.defaults["momentum"]) == (0.5, 0.9)
    rmsprop = make_optimizer("rmsprop", params, 0.2, 0.05)
    assert type(rmsprop) is torch.optim.RMSprop and (rmsprop.defaults["lr"], rmsprop.defaults["weight_decay"]) == (0.2, 0.05)
    with pytest.raises(ValueError, match="not 'adam'"):
        make_optimizer("adam", params, 0.1, 0.0)


def test_clean_joins_hard_wrapped_lines_and_keeps_paragraph_breaks():
    from stages.base import clean

    assert clean("  Once upon\na  time\n\n\n  there was\n \nno more.\n") == "Once upon a time\n\nthere was\n\nno more."
