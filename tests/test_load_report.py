"""A causal LM loaded as a reward model: one line of ours instead of transformers' alarming LOAD REPORT table, and
anything beyond the expected head swap still reported."""

from __future__ import annotations

import shutil

import pytest

import pipeline.models as models
from pipeline.models import load_base, load_tokenizer, profile_from


@pytest.mark.parametrize("arch,lm_head", [("llama", "lm_head.weight"), ("gpt_neox", "embed_out.weight")])
def test_one_line_instead_of_the_load_report(tiny_models, capfd, monkeypatch, arch, lm_head):
    monkeypatch.setattr(models, "_explained", set())  # "once per process": start this process's count afresh
    prof = profile_from(str(tiny_models[arch]))
    tok = load_tokenizer(prof)
    capfd.readouterr()
    load_base(prof, tok, kind="score")
    load_base(prof, tok, kind="score")
    err = capfd.readouterr().err
    assert "LOAD REPORT" not in err and "MISSING" not in err and "UNEXPECTED" not in err
    notes = [line for line in err.splitlines() if line.startswith("note: reward model on")]
    assert len(notes) == 1 and "score.weight" in notes[0] and lm_head in notes[0]
    monkeypatch.setattr(models, "_explained", set())
    monkeypatch.setattr(models, "is_main_process", lambda: False)  # another rank of the launch: the main one says it
    load_base(prof, tok, kind="score")
    assert "note: reward model on" not in capfd.readouterr().err


def test_other_load_problems_are_still_reported(tiny_models, tmp_path, capfd, monkeypatch):
    from safetensors.torch import load_file, save_file

    monkeypatch.setattr(models, "_explained", set())
    src = profile_from(str(tiny_models["llama"])).name_or_path
    model_dir = tmp_path / "odd"
    shutil.copytree(src, model_dir)
    weights = load_file(model_dir / "model.safetensors")
    weights["model.layers.0.extra.weight"] = weights["model.norm.weight"].clone()  # a trunk weight the model lacks
    del weights["model.layers.1.mlp.up_proj.weight"]                              # and one missing from the file
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    profile = tmp_path / "odd.yaml"
    profile.write_text(f"name_or_path: {model_dir}\n")
    prof = profile_from(str(profile))
    capfd.readouterr()
    load_base(prof, load_tokenizer(prof), kind="score")
    err = capfd.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith("warning: loading")]
    assert len(warning) == 1 and "model.layers.0.extra.weight" in warning[0]
    assert "model.layers.1.mlp.up_proj.weight" in warning[0] and "note: reward model" not in err
