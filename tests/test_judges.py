"""Gold judges (pipeline/judges.py): the three kinds score like their references; bad judges are one ConfigError."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import yaml

from pipeline.config import REPO_ROOT, ConfigError
from pipeline.judges import Judge, as_messages, judge_scores, load_judge
from tests import judge_fixtures

PROMPTS = [[{"role": "user", "content": "Once upon a time there was a rabbit."}],
           [{"role": "user", "content": "The storm had lasted all night."}],
           [{"role": "user", "content": "Alice looked at the door."}]]
TEXTS = ["She was so happy and glad, it was a wonderful day!", "He died alone in the terrible cold.",
         "The door was brown."]


def test_sentiment_is_vader_compound_of_the_response():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    judge = load_judge("sentiment")
    got = judge_scores(judge, PROMPTS, TEXTS, batch_size=2)
    analyzer = SentimentIntensityAnalyzer()
    assert got == [analyzer.polarity_scores(t)["compound"] for t in TEXTS]
    assert got[0] > 0.5 and got[1] < -0.5 and got[2] == 0.0  # happy, sad, neutral
    assert judge.name == "sentiment"


def test_function_judge_gets_batches_and_its_scores_come_back_in_order():
    judge = load_judge("tests.judge_fixtures:length_judge")
    assert judge_scores(judge, PROMPTS, TEXTS, batch_size=2) == [float(len(t)) for t in TEXTS]
    judge_fixtures.CALLS.clear()
    counted = judge_scores(load_judge("tests.judge_fixtures:counting_judge"), PROMPTS * 3, TEXTS * 3, batch_size=4)
    assert judge_fixtures.CALLS == [4, 4, 1]  # batches of batch_size, the remainder last
    assert counted == [float(len(p[-1]["content"])) for p in PROMPTS * 3]  # the prompt reaches the judge with its row


def test_a_function_judges_numpy_or_int_scores_come_back_as_floats():
    """A user's judge that returns numpy floats (`list(model(...).numpy())`) or ints: plain floats, which the reports'
    JSON can hold (a numpy float32 stopped eval's report after every policy was sampled and scored)."""
    import json

    import numpy as np

    from pipeline.judges import Judge

    for scores in ([np.float32(0.25), np.float32(0.75)], [1, 2]):
        judge = Judge("tests:fixture", "module:fixture", lambda prompts, responses, s=scores: list(s))
        got = judge_scores(judge, PROMPTS[:2], TEXTS[:2])
        assert got == [float(v) for v in scores] and all(type(v) is float for v in got), got
        json.dumps(got)


def _rm_adapter(tiny_models, out):
    from tests.fake_upstream import _lora_adapter

    spec = yaml.safe_load(tiny_models["llama"].read_text())
    return _lora_adapter(spec["name_or_path"], spec["lora_target_modules"], out, seed=2, task_type="SEQ_CLS")


def test_rm_judge_scores_like_the_pipelines_reward_path(tiny_models, tmp_path):
    """rm:<adapter> reads the chat-templated conversation as PPO's and eval's reward adapter does: same scores. Its
    load prints no "score.weight MISSING" table: the adapter holds the head (transformers' report said otherwise)."""
    from pipeline.adapters import AdapterStack, write_pooling
    from pipeline.generation import chat_reward_inputs
    from pipeline.models import load_tokenizer, profile_from

    rm_dir = _rm_adapter(tiny_models, tmp_path / "other" / "adapter")
    judge = load_judge(f"rm:{rm_dir}")
    printed = subprocess.run([sys.executable, "-c", f"from pipeline.judges import load_judge; load_judge('rm:{rm_dir}')"],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)  # transformers' own stderr
    assert printed.returncode == 0 and "LOAD REPORT" not in printed.stderr and "MISSING" not in printed.stderr, printed
    got = judge_scores(judge, PROMPTS, TEXTS, batch_size=2)
    profile = profile_from(str(tiny_models["llama"]))
    tokenizer = load_tokenizer(profile)
    stack = AdapterStack.build(profile, tokenizer, {"reward": rm_dir})
    ids, mask, starts = chat_reward_inputs(tokenizer, PROMPTS, TEXTS)
    want = stack.scores("reward", ids, mask).tolist()
    assert got == pytest.approx(want, abs=1e-5) and len({round(x, 4) for x in got}) == 3
    assert judge.name == "rm:adapter"
    # a reward model `make rm --pooling sum` saved: the judge sums its head over the reply as the stack does
    write_pooling(rm_dir, "sum")
    summed = judge_scores(load_judge(f"rm:{rm_dir}"), PROMPTS, TEXTS, batch_size=2)
    stack = AdapterStack.build(profile, tokenizer, {"reward": rm_dir})
    assert summed == pytest.approx(stack.scores("reward", ids, mask, starts).tolist(), abs=1e-5)
    everything = stack.scores("reward", ids, mask).tolist()  # the prompt's tokens too: not what the judge gives
    assert min(abs(a - b) for a, b in zip(summed, got)) > 1e-3 and min(abs(a - b) for a, b in zip(summed, everything)) > 1e-3


def test_an_rm_judge_scores_on_this_processs_accelerator(tiny_models, tmp_path, monkeypatch):
    """An rm: judge (for GPU users, a reward model larger than the policy's) ran in fp32 on the CPU whatever the
    machine: it runs on this process's GPU (LOCAL_RANK's) when there is one, its inputs moved there, its scores
    back on the CPU. On a GPU (tools/gpu_check.sh) this scores there; here, where judge_device() is the CPU, the
    model is moved to whatever it names. Mutant: the model left where it loaded."""
    import torch

    import pipeline.judges as judges

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert judges.judge_device() == torch.device("cuda", 1)
    # eval's two ranks on a machine with one GPU (or a launcher that shows each rank its own): they share it, as
    # accelerate places them (rank 1 asked for cuda:1, "invalid device ordinal")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert judges.judge_device() == torch.device("cuda", 0)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # CPU ranks (cpu2.yaml) on a machine with a GPU
    assert judges.judge_device() == torch.device("cpu")
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert judges.judge_device() == torch.device("cpu")
    monkeypatch.undo()

    rm_dir = _rm_adapter(tiny_models, tmp_path / "other" / "adapter")
    moved, real_to = [], torch.nn.Module.to

    def to(self, *args, **kwargs):
        moved.append(args[0] if args else kwargs.get("device"))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    if not torch.cuda.is_available():  # a device no other call names (cpu:0 is the CPU): the judge's own move
        monkeypatch.setattr(judges, "judge_device", lambda: torch.device("cpu", 0))
    import peft

    dtypes, real_load = [], peft.AutoPeftModelForSequenceClassification.from_pretrained

    def load(*args, **kwargs):
        dtypes.append(kwargs.get("dtype"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(peft.AutoPeftModelForSequenceClassification, "from_pretrained", load)
    judge = load_judge(f"rm:{rm_dir}")
    assert judges.judge_device() in moved
    # the checkpoint's own dtype on a GPU (a bf16 reward model stays bf16); float32 on the CPU, as every stage there
    assert dtypes == (["auto"] if torch.cuda.is_available() else [torch.float32])
    got = judge_scores(judge, PROMPTS, TEXTS, batch_size=2)
    assert len(got) == len(TEXTS) and all(isinstance(x, float) and math.isfinite(x) for x in got)


def test_a_reward_adapter_without_its_score_head_is_refused(tiny_models, tmp_path):
    """A reward adapter saved without its score head (or with modules_to_save cleared) crashed load_judge with peft's
    bare KeyError, before the check for a head ran: one ConfigError saying so, before peft loads it."""
    import json

    from safetensors.torch import load_file, save_file

    rm_dir = _rm_adapter(tiny_models, tmp_path / "other" / "adapter")
    weights = rm_dir / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(weights)).items() if "score" not in k}, str(weights),
              metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="has no trained score head"):
        load_judge(f"rm:{rm_dir}")
    config = json.loads((rm_dir / "adapter_config.json").read_text())
    (rm_dir / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": None}))
    with pytest.raises(ConfigError, match="has no trained score head"):
        load_judge(f"rm:{rm_dir}")


def test_a_reward_checkpoint_without_a_chat_template_is_refused_naming_it(tiny_models, tmp_path):
    """A judge reads chat-templated conversations: a checkpoint whose tokenizer has no template failed with the
    template error of the run's model, told to fix the model profile's chat_template (never the judge's)."""
    import json

    rm_dir = _rm_adapter(tiny_models, tmp_path / "other" / "adapter")
    for name in ("chat_template.jinja", "chat_template.json"):
        (rm_dir / name).unlink(missing_ok=True)
    config = json.loads((rm_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (rm_dir / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=f"^judge 'rm:{rm_dir}' has no chat template .* save the template it was "
                                          f"trained with beside it"):
        load_judge(f"rm:{rm_dir}")


def test_a_reward_adapter_saved_as_bin_is_loaded_not_refused(tiny_models, tmp_path):
    """An adapter_model.bin (older peft, save_safetensors=False) is not inspected for its head: peft loads it, head and
    all, and it scores as the same adapter saved as safetensors."""
    import torch
    from safetensors.torch import load_file

    rm_dir = _rm_adapter(tiny_models, tmp_path / "other" / "adapter")
    scores = judge_scores(load_judge(f"rm:{rm_dir}"), PROMPTS, TEXTS)
    weights = rm_dir / "adapter_model.safetensors"
    torch.save(load_file(str(weights)), rm_dir / "adapter_model.bin")
    weights.unlink()
    assert judge_scores(load_judge(f"rm:{rm_dir}"), PROMPTS, TEXTS) == pytest.approx(scores, abs=1e-6)


def test_a_checkpoint_without_a_score_head_is_refused_as_judge(tiny_models):
    """A full checkpoint that is not a reward model (the base itself, a merged policy) loads as a classifier whose head
    is drawn at random on every load: refused, naming the head, instead of grading with noise."""
    base = yaml.safe_load(tiny_models["llama"].read_text())["name_or_path"]
    with pytest.raises(ConfigError, match=r"has no trained score head \(score\.weight would be drawn at random"):
        load_judge(f"rm:{base}")


def test_a_reward_checkpoint_whose_tokenizer_has_no_pad_token_pads_with_eos(tmp_path):
    """A sequence-classification checkpoint with a Llama-3 style tokenizer (no pad token, no pad_token_id): the judge
    pads a batch with EOS, as the pipeline does, and reads each row where it reads it alone."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tests.conftest import build_template_model, build_template_tokenizer

    tok_dir = build_template_tokenizer("llama3", tmp_path / "tok")
    assert AutoTokenizer.from_pretrained(tok_dir).pad_token is None
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(build_template_model("llama3", tok_dir, tmp_path / "lm"),
                                                            num_labels=1)
    rm.config.pad_token_id = None
    rm.save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(tmp_path / "rm")
    judge = load_judge(f"rm:{tmp_path / 'rm'}")
    together = judge_scores(judge, PROMPTS, TEXTS)
    assert together == pytest.approx([judge_scores(judge, [p], [t])[0] for p, t in zip(PROMPTS, TEXTS)], abs=1e-5)
    assert len(set(together)) == 3


def test_a_function_judges_spec_needs_a_function_name_after_its_colon():
    """`module:function`: what follows the colon is a Python name, as getattr needs it; a dashed, dotted or numeric
    one (`length-judge`, a typo) is refused at make's check, before any stage runs, not after SFT and PPO trained."""
    from pipeline.config import function_spec_module
    from pipeline.judges import check_judge_spec

    assert function_spec_module("tests.judge_fixtures:length_judge") == "tests.judge_fixtures"
    for spec in ("tests.judge_fixtures:length-judge", "tests.judge_fixtures:2judge", "tests.judge_fixtures:a.b"):
        assert function_spec_module(spec) is None, spec
        with pytest.raises(ConfigError, match=f"^unknown judge '{spec}'"):
            check_judge_spec(spec)


def test_a_spec_make_checks_is_refused_as_loading_it_would_be(tmp_path):
    """check_judge_spec (make, before any stage runs) refuses what load_judge would: an rm: path that is no folder, and
    a module:function whose module part is no importable name (a file path)."""
    from pipeline.judges import check_judge_spec

    with pytest.raises(ConfigError, match="is not a folder"):
        check_judge_spec(f"rm:{tmp_path / 'missing'}")
    with pytest.raises(ConfigError, match="unknown judge 'judges/mine.py:score'"):
        check_judge_spec("judges/mine.py:score")
    check_judge_spec(f"rm:{tmp_path}")
    check_judge_spec("tests.judge_fixtures:length_judge")
    check_judge_spec("math:sqrt")  # a module without a source file of its own: found by the import system
    # your own module not on the Python path: refused at the check (it failed after SFT, pairs, labels, the reward
    # models and PPO had run), saying how to put it there; found once its folder is on sys.path (PYTHONPATH)
    (tmp_path / "myjudges").mkdir()
    (tmp_path / "myjudges" / "__init__.py").write_text("")
    (tmp_path / "myjudges" / "happy.py").write_text("def score(prompts, responses):\n    return [0.0] * len(responses)\n")
    (tmp_path / "flat_judge_xyz.py").write_text("def score(prompts, responses):\n    return [0.0] * len(responses)\n")
    for spec, file in (("myjudges.happy:score", "myjudges/happy.py"), ("flat_judge_xyz:score", "flat_judge_xyz.py")):
        with pytest.raises(ConfigError) as err:
            check_judge_spec(spec)
        module = spec.partition(":")[0]
        assert str(err.value) == (f"judge '{spec}': no module '{module}' on the Python path: put the folder that holds "
                                  f"{file[:-3]}.py on PYTHONPATH (PYTHONPATH=/path/to/that/folder make ...)")
        with pytest.raises(ConfigError, match=r"cannot import module .*; put the folder that holds .* on PYTHONPATH"):
            load_judge(spec)
    (tmp_path / "broken_judge_xyz.py").write_text("import numpyy_not_installed\n")  # found; its own import fails
    monkeypatch_path = [str(tmp_path), *sys.path]
    import unittest.mock

    with unittest.mock.patch.object(sys, "path", monkeypatch_path):
        check_judge_spec("myjudges.happy:score")
        check_judge_spec("flat_judge_xyz:score")
        from pipeline.config import module_source

        assert module_source("myjudges.happy:score") == tmp_path / "myjudges" / "happy.py"
        assert module_source("myjudges:score") == tmp_path / "myjudges" / "__init__.py"
        (tmp_path / "myjudges.py").write_text("")  # beside the package: import takes the package, so is its source
        assert module_source("myjudges:score") == tmp_path / "myjudges" / "__init__.py"
        assert module_source("flat_judge_xyz:score") == tmp_path / "flat_judge_xyz.py"
        assert module_source("myjudges.sad:score") is None and module_source("sentiment") is None
        with pytest.raises(ConfigError) as err:  # the module is there: the path is not the fix
            load_judge("broken_judge_xyz:score")
        assert "No module named 'numpyy_not_installed'" in str(err.value) and "PYTHONPATH" not in str(err.value)


def test_the_runs_own_reward_model_is_refused_as_judge(tiny_models, tmp_path):
    rm_dir = _rm_adapter(tiny_models, tmp_path / "rm" / "adapter")
    for spec in (f"rm:{rm_dir}", f"rm:{rm_dir.parent}", f"rm:{rm_dir}/"):
        with pytest.raises(ConfigError, match="reward model this run's PPO optimised"):
            load_judge(spec, forbidden_rm=[rm_dir])
    load_judge(f"rm:{rm_dir}", forbidden_rm=[tmp_path / "elsewhere" / "adapter"])  # another RM is a fine judge


def test_the_runs_own_reward_model_is_refused_by_any_path_that_leads_to_it(tmp_path, monkeypatch):
    """Paths are compared as the files they name (resolved, or the same file), not as text: the run's reward model
    reached through a symlink, a repo-relative path, a `..`, or named relative to the working directory is still it.
    (Refused before anything is loaded, so empty folders stand in for the adapters.)"""
    import os

    from pipeline.config import REPO_ROOT

    own = tmp_path / "runs" / "t" / "rm" / "adapter"
    own.mkdir(parents=True)
    (tmp_path / "to-adapter").symlink_to(own)
    (tmp_path / "to-rm").symlink_to(own.parent)
    for spec in (f"rm:{tmp_path / 'to-adapter'}", f"rm:{tmp_path / 'to-rm'}", f"rm:{os.path.relpath(own, REPO_ROOT)}",
                 f"rm:{own.parent}/../rm/adapter"):
        with pytest.raises(ConfigError, match="reward model this run's PPO optimised"):
            load_judge(spec, forbidden_rm=[own])
    monkeypatch.chdir(tmp_path)  # as main passes it: the rm stage's folder under a runs_dir relative to the cwd
    with pytest.raises(ConfigError, match="reward model this run's PPO optimised"):
        load_judge(f"rm:{own}", forbidden_rm=["runs/t/rm/adapter"])


def test_a_string_prompt_reaches_the_reward_model_as_one_user_message(tiny_models, tmp_path, monkeypatch):
    """A prompt given as plain text is the conversation [{"role": "user", "content": text}]: the rm judge templates
    exactly that (and so scores it as it scores the same prompt given as a user message); message lists pass as
    they are."""
    import pipeline.generation

    assert as_messages("Hi there.") == [{"role": "user", "content": "Hi there."}]
    assert as_messages(PROMPTS[0]) == PROMPTS[0] and as_messages(PROMPTS[0])[0] is not PROMPTS[0][0]  # a copy
    rm_dir = _rm_adapter(tiny_models, tmp_path / "other" / "adapter")
    judge = load_judge(f"rm:{rm_dir}")
    seen = []
    real = pipeline.generation.chat_reward_inputs

    def spy(tokenizer, prompts, texts):
        seen.extend(prompts)
        return real(tokenizer, prompts, texts)

    monkeypatch.setattr(pipeline.generation, "chat_reward_inputs", spy)
    plain = [p[0]["content"] for p in PROMPTS]
    got = judge_scores(judge, plain, TEXTS, batch_size=2)
    assert seen == PROMPTS  # each [{"role": "user", "content": ...}]
    assert got == pytest.approx(judge_scores(judge, PROMPTS, TEXTS, batch_size=2), abs=1e-6)


def test_a_judge_spec_is_read_without_surrounding_whitespace():
    """load_judge strips the spec as a config may write it (" sentiment ", a trailing newline): the same judge."""
    judge = load_judge(" sentiment ")
    assert (judge.spec, judge.name) == ("sentiment", "sentiment")
    assert judge_scores(judge, PROMPTS, TEXTS) == judge_scores(load_judge("sentiment"), PROMPTS, TEXTS)
    judge = load_judge("\ttests.judge_fixtures:length_judge \n")
    assert judge.name == "tests.judge_fixtures:length_judge"
    assert judge_scores(judge, PROMPTS, TEXTS) == [float(len(t)) for t in TEXTS]


def test_an_rm_judge_names_its_folder_without_the_space_after_the_colon(tmp_path):
    """`gold_judge: rm: runs/big/rm/adapter`, a space after the colon as people type it: the folder is
    runs/big/rm/adapter, not " runs/big/rm/adapter" (a folder that does not exist, refused by make's check)."""
    from pipeline.judges import check_judge_spec, judge_kind

    assert judge_kind("rm: runs/big/rm/adapter") == ("rm", "runs/big/rm/adapter")
    assert judge_kind(" rm:\truns/big/rm/adapter \n") == ("rm", "runs/big/rm/adapter")
    check_judge_spec(f"rm: {tmp_path}")  # the folder exists: no error


def test_each_judge_form_is_described_by_whose_scores_they_are():
    """The reports print describe_judge beside the gold figures (a gold mean says little without its scale): a
    reward model's scores are its own scale, not "your function's"."""
    from pipeline.judges import describe_judge

    assert describe_judge("rm:runs/big/rm/adapter") == ("the score the reward model runs/big/rm/adapter gives the reply, "
                                                        "on its own scale")
    assert describe_judge("tests.judge_fixtures:length_judge") == ("the score your function "
                                                                   "tests.judge_fixtures:length_judge gives the reply")
    assert describe_judge(" sentiment ") == "VADER's compound sentiment of the reply, from -1, negative, to 1, positive"


def test_bool_scores_and_mismatched_rows_are_refused():
    """A bool is not a score (True would silently count as 1.0): ConfigError naming the row. And prompts and responses
    must pair up one to one: 1 prompt for 2 responses is a ValueError before the judge is called."""
    bools = Judge("bool_judge", "bool_judge", lambda prompts, responses: [True, False])
    with pytest.raises(ConfigError, match=r"judge 'bool_judge' gave True for row 0: every score must be a finite"):
        judge_scores(bools, PROMPTS[:2], TEXTS[:2])
    ints = Judge("ints", "ints", lambda p, r: [1, 0])
    assert judge_scores(ints, PROMPTS[:2], TEXTS[:2]) == [1.0, 0.0]  # ints are numbers: fine
    huge = Judge("huge", "huge", lambda p, r: [1, 10**400])  # an int, but past float's range: not a traceback
    with pytest.raises(ConfigError, match=r"judge 'huge' gave 1(0){38}… for row 1: every score must be a finite"):
        judge_scores(huge, PROMPTS[:2], TEXTS[:2])
    vast = Judge("vast", "vast", lambda p, r: [1e100, -1e101])  # finite, but past the bound (1e308 overflowed eval)
    with pytest.raises(ConfigError, match=r"judge 'vast' gave -1e\+101 for row 1: scores beyond ±1e\+100 overflow"):
        judge_scores(vast, PROMPTS[:2], TEXTS[:2])
    calls = []
    counting = Judge("c", "c", lambda p, r: calls.append(len(r)) or [0.0] * len(r))
    with pytest.raises(ValueError, match="1 prompts but 2 responses"):
        judge_scores(counting, PROMPTS[:1], TEXTS[:2])
    with pytest.raises(ValueError, match="3 prompts but 2 responses"):
        judge_scores(counting, PROMPTS, TEXTS[:2])
    assert calls == []


@pytest.mark.parametrize("spec, message", [
    ("vibes", "unknown judge 'vibes'"),
    ("", "unknown judge ''"),
    ("rm:", "unknown judge 'rm:'"),
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("tests.judge_fixtures:missing", "has no function 'missing'"),
    ("tests.judge_fixtures:NOT_A_FUNCTION", "has no function 'NOT_A_FUNCTION'"),
    ("rm:/no/such/folder", "is not a folder"),
])
def test_unknown_or_unloadable_judge_is_one_config_error(spec, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_judge(spec)


@pytest.mark.parametrize("function, message", [
    ("raising_judge", r"failed on rows 0-1: RuntimeError: the grader is on holiday"),
    ("nan_judge", r"gave nan for row 0: every score must be a finite number"),
    ("short_judge", r"returned 1 scores for a batch of 2 responses"),
    ("long_judge", r"returned 3 scores for a batch of 2 responses"),  # extra scores would shift every later row
    ("text_judge", r"gave 'good' for row 0"),
    ("dict_judge", r"returned a dict for rows 0-1: it must return a list of scores, one per response, in order"),
    ("set_judge", r"returned a set for rows 0-1"),
])
def test_a_judge_that_misbehaves_is_one_config_error_naming_it(function, message):
    judge = load_judge(f"tests.judge_fixtures:{function}")
    with pytest.raises(ConfigError, match=message) as err:
        judge_scores(judge, PROMPTS, TEXTS, batch_size=2)
    assert f"tests.judge_fixtures:{function}" in str(err.value)


def test_an_array_or_a_tensor_of_scores_is_taken_in_order():
    judge = load_judge("tests.judge_fixtures:array_judge")
    assert judge_scores(judge, PROMPTS, TEXTS, batch_size=2) == [float(len(t)) for t in TEXTS]


def test_a_bad_score_or_a_failing_batch_names_its_row_in_the_whole_list():
    """Rows are counted over all the responses, not within a batch: with batches of 2, the third response is row 2."""
    third = lambda p, r: [float("nan") if t == TEXTS[2] else 0.0 for t in r]  # noqa: E731
    with pytest.raises(ConfigError, match=r"judge 'third' gave nan for row 2: every score must be a finite number"):
        judge_scores(Judge("third", "third", third), PROMPTS, TEXTS, batch_size=2)

    def fails_late(prompts, responses):
        if TEXTS[2] in responses:
            raise RuntimeError("no")
        return [0.0] * len(responses)

    with pytest.raises(ConfigError, match=r"judge 'late' failed on rows 2-2: RuntimeError: no"):
        judge_scores(Judge("late", "late", fails_late), PROMPTS, TEXTS, batch_size=2)


def test_a_config_error_a_judge_raises_passes_through_as_it_is():
    """A judge that raises ConfigError itself (a function judge checking its own input) has said what is wrong already:
    judge_scores passes it on unchanged, not wrapped as a failure on rows 0-2 with the type name in front."""
    def refuses(prompts, responses):
        raise ConfigError("my judge needs English prompts")

    with pytest.raises(ConfigError) as err:
        judge_scores(Judge("mine", "mine", refuses), PROMPTS, TEXTS)
    assert str(err.value) == "my judge needs English prompts"
