"""bench/bench_sft.py: a one-round smoke run on a tiny random Llama (both sides launched for real), and its parser."""

from __future__ import annotations

import json

import pytest

from bench.bench_sft import final_metrics
from tests.conftest import run_python

SMALL_DATA = '{"data/sft/self_instruct.jsonl": 48}'


def test_final_metrics_reads_the_end_of_train_dict():
    out = ("  5/5 [00:06<00:00] {'loss': '6.9', 'num_input_tokens_seen': 100, 'train_runtime': '1.0'}\r"
           "{'train_runtime': '13.5', 'train_samples_per_second': '5.924', 'train_loss': '6.859', 'epoch': '0.1053', "
           "'num_input_tokens_seen': 30008}\n✅ Training completed.")
    m = final_metrics(out)
    assert m["train_runtime"] == 13.5 and m["num_input_tokens_seen"] == 30008 and m["train_loss"] == 6.859
    assert final_metrics("Traceback ...") == {}


def test_bench_sft_smoke(tiny_models, tmp_path):
    out = tmp_path / "sft.json"
    res = run_python("bench.bench_sft", [
        "--rounds", "1", "--max_steps", "2", "--model_config", str(tiny_models["llama"]), "--output", str(out),
        # stage overrides: they must reach both sides
        "--learning_rate", "1e-3", "--max_length", "128", "--dataset_mixture", SMALL_DATA,
        "--sample_max_new_tokens", "4", "--logging_steps", "1",
    ], timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r = json.loads(out.read_text())
    for key in ("ours_tokens_per_s", "trl_tokens_per_s", "ratio", "rounds", "settings", "versions", "machine", "metric"):
        assert key in r, key
    assert len(r["rounds"]) == 1 and r["settings"]["rounds"] == 1 and r["settings"]["max_steps"] == 2
    round1 = r["rounds"][0]
    for side in ("ours", "trl"):
        assert round1[side]["tokens_per_s"] > 0 and round1[side]["num_input_tokens_seen"] > 0
        assert round1[side]["train_runtime_s"] > 0 and len(round1[side]["loadavg_before"]) == 3
    assert r["ratio"] == pytest.approx(r["ours_tokens_per_s"] / r["trl_tokens_per_s"], rel=1e-3)
    # same model, data and hyper-parameters on both sides: same tokens, same loss, overrides carried to TRL
    assert r["same_tokens_every_run"] and r["same_train_loss_each_round"], round1
    trl = r["settings"]["trl_config"]
    assert trl["learning_rate"] == 1e-3 and trl["max_length"] == 128 and trl["max_steps"] == 2
    assert trl["assistant_only_loss"] is True and trl["use_peft"] is True and trl["lora_r"] == 16
    assert trl["model_name_or_path"] == r["settings"]["base_model"] and r["settings"]["train_rows"] > 0
    assert r["versions"]["trl"] and len(r["machine"]["loadavg_start"]) == 3


def _round(ours: float, trl: float, tokens=(500, 500), loss=(1.5, 1.5)) -> dict:
    return {"ours": {"tokens_per_s": ours, "num_input_tokens_seen": tokens[0], "train_loss": loss[0]},
            "trl": {"tokens_per_s": trl, "num_input_tokens_seen": tokens[1], "train_loss": loss[1]},
            "ratio": round(ours / trl, 4)}


def test_summary_medians_ratio_and_verdict_by_hand():
    """Medians over rounds (not means) of each side's tokens/s; ratio = ours / trl, the target met at 0.95 itself;
    no verdict when the two sides did different work (tokens or train loss)."""
    from bench.bench_sft import summary

    s = summary([_round(95.0, 100.0), _round(90.0, 100.0), _round(200.0, 100.0)])
    assert (s["ours_tokens_per_s"], s["trl_tokens_per_s"], s["ratio"]) == (95.0, 100.0, 0.95)
    assert s["meets_target"] is True and s["median_of_round_ratios"] == 0.95
    assert s["same_tokens_every_run"] is True and s["same_train_loss_each_round"] is True
    assert summary([_round(94.0, 100.0)])["meets_target"] is False
    other_loss = summary([_round(95.0, 100.0), _round(95.0, 100.0, loss=(1.5, 1.6))])
    assert other_loss["same_train_loss_each_round"] is False and other_loss["meets_target"] is None
    other_tokens = summary([_round(95.0, 100.0), _round(95.0, 100.0, tokens=(500, 501))])
    assert other_tokens["same_tokens_every_run"] is False and other_tokens["meets_target"] is None


def test_run_side_tokens_per_s_is_over_the_trainers_runtime_not_the_commands_wall():
    import os
    import sys

    from bench.bench_sft import run_side

    line = "{'train_runtime': '2.0', 'train_loss': '1.5', 'num_input_tokens_seen': 300}"
    cmd = [sys.executable, "-c", f"import time; time.sleep(0.3); print({line!r})"]
    r = run_side("fake", cmd, dict(os.environ), timeout=60)
    assert r["tokens_per_s"] == 150.0 and r["num_input_tokens_seen"] == 300 and r["train_loss"] == 1.5
    assert r["train_runtime_s"] == 2.0 and r["wall_s"] >= 0.3
    with pytest.raises(SystemExit, match="fake failed"):
        run_side("fake", [sys.executable, "-c", "print('no metrics')"], dict(os.environ), timeout=60)


def test_summary_takes_the_peers_median_too():
    from bench.bench_sft import summary

    s = summary([_round(90.0, 100.0), _round(95.0, 110.0), _round(100.0, 200.0)])
    assert (s["ours_tokens_per_s"], s["trl_tokens_per_s"], s["ratio"]) == (95.0, 110.0, 0.8636)  # trl's mean 136.7


def test_final_metrics_takes_the_last_end_of_train_dict_and_a_failed_run_is_refused():
    import os
    import sys

    from bench.bench_sft import run_side

    out = "{'train_runtime': '9.0', 'num_input_tokens_seen': 10}\n...\n{'train_runtime': '2.0', 'num_input_tokens_seen': 300}"
    assert final_metrics(out) == {"train_runtime": 2.0, "num_input_tokens_seen": 300.0}
    line = "{'train_runtime': '2.0', 'train_loss': '1.5', 'num_input_tokens_seen': 300}"
    crashed = [sys.executable, "-c", f"import sys; print({line!r}); sys.exit(3)"]  # its metrics printed, then it failed
    with pytest.raises(SystemExit, match=r"fake failed \(exit 3"):
        run_side("fake", crashed, dict(os.environ), timeout=60)


def test_parse_bench_args_counts_tokens_and_refuses_no_rounds():
    from bench.bench_sft import parse_bench_args

    bench, overrides = parse_bench_args(["--rounds", "2", "--max_steps", "3", "--learning_rate", "1e-3"])
    assert overrides == ["--learning_rate", "1e-3", "--max_steps", "3", "--include_num_input_tokens_seen", "true"]
    with pytest.raises(SystemExit):
        parse_bench_args(["--rounds", "0"])


def test_main_alternates_the_sides_and_voids_unequal_work(monkeypatch, tmp_path):
    """Odd rounds run ours first, even rounds TRL first; each round's ratio is ours / TRL's; a round whose two sides
    trained to different losses writes the result with no verdict and exits non-zero."""
    import os
    from types import SimpleNamespace

    from bench import bench_sft

    for k, v in bench_sft.ENV_DEFAULTS.items():  # main() sets them in os.environ: put them back afterwards
        monkeypatch.setenv(k, os.environ.get(k, v))
    monkeypatch.setattr(bench_sft, "snapshot_configs", lambda overrides, work: (work / "sft.yaml", overrides, "m.yaml"))
    monkeypatch.setattr(bench_sft, "trl_config", lambda config, overrides, data, out: (
        {"include_num_input_tokens_seen": True, "model_name_or_path": str(tmp_path / "no-model")},
        {"train_cfg": SimpleNamespace(max_steps=3)}))
    monkeypatch.setattr(bench_sft, "write_train_rows", lambda resolved, data_dir: 5)
    tokens_per_s = {"ours": [90.0, 120.0, 95.0], "trl": [100.0, 100.0, 100.0]}
    calls, losses = [], {"ours": [1.5, 1.5, 1.5], "trl": [1.5, 1.5, 1.5]}

    def fake_run_side(name, cmd, env, timeout):
        rnd = sum(c == name for c in calls)
        calls.append(name)
        return {"tokens_per_s": tokens_per_s[name][rnd], "num_input_tokens_seen": 500, "train_loss": losses[name][rnd],
                "train_runtime_s": 1.0, "loadavg_before": [0.0, 0.0, 0.0]}

    monkeypatch.setattr(bench_sft, "run_side", fake_run_side)
    argv = ["--rounds", "3", "--max_steps", "3", "--workdir", str(tmp_path / "work"), "--output", str(tmp_path / "sft.json")]
    res = bench_sft.main(argv)
    assert calls == ["ours", "trl", "trl", "ours", "ours", "trl"]
    assert [r["order"] for r in res["rounds"]] == [["ours", "trl"], ["trl", "ours"], ["ours", "trl"]]
    assert [r["ratio"] for r in res["rounds"]] == [0.9, 1.2, 0.95]
    assert (res["ratio"], res["median_of_round_ratios"], res["meets_target"]) == (0.95, 0.95, True)
    calls.clear()
    losses["trl"][1] = 1.6
    with pytest.raises(SystemExit, match="did not do the same work"):
        bench_sft.main(argv)
    written = json.loads((tmp_path / "sft.json").read_text())
    assert written["same_train_loss_each_round"] is False and written["meets_target"] is None


def test_run_side_cpu_seconds_are_the_childs_user_plus_system_time(monkeypatch):
    """cpu_s: the children's user + system CPU seconds after the run minus before it (wall against CPU shows how long a
    run waited for a core)."""
    import os
    import sys
    from types import SimpleNamespace

    from bench import bench_sft

    usage = iter([SimpleNamespace(ru_utime=10.0, ru_stime=4.0), SimpleNamespace(ru_utime=12.5, ru_stime=5.25)])
    monkeypatch.setattr(bench_sft.resource, "getrusage", lambda who: next(usage))
    line = "{'train_runtime': '2.0', 'train_loss': '1.5', 'num_input_tokens_seen': 300}"
    r = bench_sft.run_side("fake", [sys.executable, "-c", f"print({line!r})"], dict(os.environ), timeout=60)
    assert r["cpu_s"] == 3.75  # (12.5 - 10.0) + (5.25 - 4.0)


@pytest.mark.parametrize("as_file", [False, True])
def test_trls_side_gets_the_profiles_template_given_as_text_or_as_a_file(as_file, tiny_models, tmp_path):
    """A profile's chat_template may be the template text itself; TRL's chat_template_path takes a file: the text
    was passed as a path (and failed), now both reach TRL as a file holding the profile's template."""
    import yaml

    from bench.bench_sft import trl_config
    from tests.conftest import REPO

    text = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    value = text
    if as_file:
        (tmp_path / "mine.jinja").write_text(text)
        value = str(tmp_path / "mine.jinja")
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump({**yaml.safe_load(tiny_models["llama"].read_text()), "chat_template": value}))
    cfg, _ = trl_config(REPO / "configs/sft.yaml", ["--model_config", str(profile)], tmp_path / "work/data",
                        tmp_path / "work/trl_out")
    assert open(cfg["chat_template_path"]).read() == text


def test_trl_side_trains_on_the_cpu_as_ours(tiny_models, tmp_path):
    """Both sides launch with configs/accelerate/cpu.yaml, but transformers' Trainer takes a GPU it sees unless its own
    use_cpu is set (ours gets it from the launch): on a GPU machine TRL trained there, ours on the CPU."""
    from bench.bench_sft import ACCELERATE_CONFIG, trl_config
    from pipeline.config import read_yaml
    from tests.conftest import REPO

    cfg, _ = trl_config(REPO / "configs/sft.yaml", ["--model_config", str(tiny_models["llama"])], tmp_path / "work/data",
                        tmp_path / "work/trl_out")
    assert cfg["use_cpu"] is True and read_yaml(REPO / ACCELERATE_CONFIG)["use_cpu"] is True
