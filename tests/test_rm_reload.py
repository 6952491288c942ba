"""The reward stage's fresh-process reload check under bf16: judged at the tolerance of the dtype it computes in, and
when it fails, its message names the cause (the dtype, or a head that was not saved)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from stages.rm_scoring import check_reload, reload_verdict

BEFORE_CHOSEN, BEFORE_REJECTED = [4.0, 2.5, -1.0, 1.0], [-3.0, 0.5, -2.0, 0.999]


def scaled(xs, factor):
    return [x * factor for x in xs]


def test_float32_tolerance_is_tight():
    assert reload_verdict(BEFORE_CHOSEN, BEFORE_REJECTED, [x + 5e-5 for x in BEFORE_CHOSEN], BEFORE_REJECTED)["ok"]
    v = reload_verdict(BEFORE_CHOSEN, BEFORE_REJECTED, [x + 2e-4 for x in BEFORE_CHOSEN], BEFORE_REJECTED)
    assert not v["ok"] and "more than float32 rounding allows" in v["problem"]


def test_bf16_rounding_passes_and_a_near_tie_may_flip():
    # 1% off everywhere (bf16 keeps 8 mantissa bits) and the 1.0 / 0.999 near-tie swapped: still the same model
    chosen, rejected = scaled(BEFORE_CHOSEN, 1.01), scaled(BEFORE_REJECTED, 1.01)
    chosen[3], rejected[3] = 0.998, 1.0
    v = reload_verdict(BEFORE_CHOSEN, BEFORE_REJECTED, chosen, rejected, "bfloat16")
    assert v["ok"] and v["pairs_flipped"] == 0 and v["dtype"] == "bfloat16"
    assert v["max_abs_diff"] == pytest.approx(0.04)  # hand computed: 4.0 * 1%
    # the same drift is far beyond float32's tolerance
    assert not reload_verdict(BEFORE_CHOSEN, BEFORE_REJECTED, chosen, rejected, "float32")["ok"]
    # a 4-bit base computes in bf16 whatever the profile's dtype says
    assert reload_verdict(BEFORE_CHOSEN, BEFORE_REJECTED, chosen, rejected, "float32", load_in_4bit=True)["ok"]


def test_bf16_drift_beyond_rounding_names_the_dtype_not_the_head():
    v = reload_verdict(BEFORE_CHOSEN, BEFORE_REJECTED, scaled(BEFORE_CHOSEN, 1.2), scaled(BEFORE_REJECTED, 1.2), "bfloat16")
    assert not v["ok"] and "more than bfloat16 rounding allows" in v["problem"] and "the head was saved" in v["problem"]
    assert "not saved" not in v["problem"]


def test_scores_that_do_not_follow_blame_the_head():
    rng = random.Random(0)
    noise = [rng.uniform(-3, 3) for _ in range(8)]
    v = reload_verdict(BEFORE_CHOSEN, BEFORE_REJECTED, noise[:4], noise[4:], "bfloat16")
    assert not v["ok"] and "score head was probably not saved" in v["problem"]


def test_scores_that_only_roughly_follow_blame_the_head():
    """Only scores that follow the stage's closely (correlation >= 0.99) point at a dtype: each score 0.5 or 1.0 off,
    alternately up and down, still correlate 0.974 and 0.887 with the stage's (numpy.corrcoef of the eight scores),
    and that is another head. Mutant: a looser threshold blaming the dtype for them."""
    before = BEFORE_CHOSEN + BEFORE_REJECTED
    for step, correlation in ((0.5, "0.974"), (1.0, "0.887")):
        after = [s + step * (-1) ** i for i, s in enumerate(before)]
        v = reload_verdict(BEFORE_CHOSEN, BEFORE_REJECTED, after[:4], after[4:], "bfloat16")
        assert not v["ok"] and f"correlation {correlation}: the score head was probably not saved" in v["problem"]


def test_bf16_stage_with_a_float32_head_passes_the_fresh_process_check(tiny_models_bf16, tmp_path):
    """What a bf16 reward stage sees when its score head trains in float32 (peft leaves modules_to_save in the base's
    dtype, so the stage keeps the head in float32): the stock reload in bf16 rounds that head. The scores differ by a
    few hundredths on scores of several units, more than the old fixed 2e-2, which blamed a missing head."""
    import yaml
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    from pipeline.models import load_base, load_tokenizer, profile_from
    from stages.rm_data import encode_pair
    from stages.rm_scoring import score
    from tests.fake_upstream import _lora_adapter

    spec = yaml.safe_load(open(tiny_models_bf16["llama"]))
    adapter = _lora_adapter(spec["name_or_path"], spec["lora_target_modules"], tmp_path / "rm" / "adapter", seed=2,
                            task_type="SEQ_CLS")
    weights = load_file(adapter / "adapter_model.safetensors")  # a head of several units' reach, as after training
    save_file({k: v * 40 if ".score." in k else v for k, v in weights.items()}, adapter / "adapter_model.safetensors")
    pairs = [{"prompt": [{"role": "user", "content": f"Say something about the number {i}."}],
              "chosen": [{"role": "assistant", "content": "The cat sat on a mat " * (1 + i % 3)}],
              "rejected": [{"role": "assistant", "content": f"A little rabbit, {i}."}]} for i in range(12)]
    pairs_file = tmp_path / "rm" / "eval_pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(p) + "\n" for p in pairs))

    profile = profile_from(str(tiny_models_bf16["llama"]))
    tok = load_tokenizer(profile)
    model = PeftModel.from_pretrained(load_base(profile, tok, kind="score"), str(adapter)).eval()
    head = model.base_model.model.score.modules_to_save["default"].float()
    head.register_forward_pre_hook(lambda module, args: (args[0].float(),))
    encoded = [encode_pair(tok, p) for p in pairs]
    scores = score(model, [c for c, _ in encoded] + [r for _, r in encoded], tok.pad_token_id, 16)
    [result], _ = check_reload([adapter], pairs_file, [(scores[:12], scores[12:])], "bfloat16")
    assert result["dtype"] == "bfloat16" and result["pairs_flipped"] == 0
    assert 2e-2 < result["max_abs_diff"] and max(abs(s) for s in scores) > 2, (result, scores)


def test_bf16_tolerance_is_rounding_not_more():
    """bf16 allows 0.05 + 3% of the score: every score 0.04 higher passes; every score 0.2 higher does not, since the
    largest score (4.0 -> 4.2) allows only 0.05 + 0.03 * 4.2 = 0.176. The message names the dtype (the scores follow)."""
    assert reload_verdict(BEFORE_CHOSEN, BEFORE_REJECTED, [x + 0.04 for x in BEFORE_CHOSEN],
                          [x + 0.04 for x in BEFORE_REJECTED], "bfloat16")["ok"]
    v = reload_verdict(BEFORE_CHOSEN, BEFORE_REJECTED, [x + 0.2 for x in BEFORE_CHOSEN], [x + 0.2 for x in BEFORE_REJECTED],
                       "bfloat16")
    assert not v["ok"] and v["pairs_flipped"] == 0 and "more than bfloat16 rounding allows" in v["problem"]
    assert v["max_abs_diff"] == pytest.approx(0.2)


def test_a_scores_tolerance_is_of_the_larger_of_its_two_values():
    """rtol applies to the larger magnitude of a score's two values, the stage's and the reload's: 4.0 -> 4.175 in bf16
    allows 0.05 + 0.03 * 4.175 = 0.17525 and passes (of the stage's 4.0 alone it would allow 0.17 and fail), 4.0 ->
    4.18 allows 0.1754 and fails. Mutant: the tolerance of the stage's score alone."""
    assert reload_verdict([4.0], [-3.0], [4.175], [-3.0], "bfloat16")["ok"]
    assert not reload_verdict([4.0], [-3.0], [4.18], [-3.0], "bfloat16")["ok"]


def test_a_pair_flips_by_rounding_alone_when_its_margin_is_within_both_scores_tolerances():
    """Each score may move by its tolerance, so a pair's margin by both: a margin of 1.5e-4 in float32 (atol 1e-4 a
    score) turns to -3e-5 with each score 9e-5 off. That is rounding, not another model: it passes and no pair counts
    as flipped. Mutant: a flip counted against one score's tolerance (1e-4 < 1.5e-4), failing a faithful reload."""
    v = reload_verdict([3e-4], [1.5e-4], [2.1e-4], [2.4e-4], "float32")
    assert v["ok"] and v["pairs_flipped"] == 0 and v["max_abs_diff"] == pytest.approx(9e-5)


def test_an_adapter_file_without_the_score_head_is_refused(tmp_path):
    """The stage's own check of the saved file: LoRA weights alone (the head left out) are refused by name; the same
    file with the head's weight passes."""
    from safetensors.torch import save_file

    from stages.rm_scoring import require_saved_head

    lora = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 8),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, 4)}
    save_file(lora, tmp_path / "adapter_model.safetensors")
    with pytest.raises(RuntimeError, match=f"{tmp_path} holds LoRA weights but no 'score' head"):
        require_saved_head(tmp_path, "score")
    save_file({**lora, "base_model.model.score.weight": torch.zeros(1, 8)}, tmp_path / "adapter_model.safetensors")
    require_saved_head(tmp_path, "score")
