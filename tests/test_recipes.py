"""The two recipes: the default story task (data/story/, configs/*.yaml) and the assistant recipe
(configs/recipes/assistant/), picked by one Make variable; the story data's split and limits."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys

import pytest

from pipeline.config import ConfigError, parse, read_yaml
from tests.conftest import REPO
from tests.test_config import resolved_yaml, stage_classes

RECIPE_CONFIGS = sorted((REPO / "configs" / "recipes").glob("*/*.yaml"))
STORY = REPO / "data" / "story"


@pytest.mark.parametrize("path", RECIPE_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_yaml_parses(path):
    parsed = parse(stage_classes(path.stem), ["--config", str(path)])
    for key, value in resolved_yaml(path).items():
        got = getattr(next(obj for obj in parsed if hasattr(obj, key)), key)
        got = got.value if hasattr(got, "value") else got
        assert got == value or str(got) == str(value) or (value == "none" and got in ([], ["none"])), key


def test_the_assistant_recipe_keeps_the_bundled_assistant_data():
    sft = read_yaml(REPO / "configs/recipes/assistant/sft.yaml")["dataset_mixture"]
    rm = read_yaml(REPO / "configs/recipes/assistant/rm.yaml")["dataset_mixture"]
    assert set(sft) == {"data/sft/oasst.jsonl", "data/sft/self_instruct.jsonl", "data/sft/gsm8k.jsonl"}
    assert set(rm) == {"label-export", "data/preferences/oasst.jsonl", "data/preferences/pandalm.jsonl",
                       "data/preferences/tulu.jsonl"}
    files = {stage: read_yaml(REPO / f"configs/recipes/assistant/{stage}.yaml")["prompts_file"] for stage in ("pairs", "ppo")}
    assert files == {"pairs": "data/prompts/oasst_pairs_prompts.jsonl", "ppo": "data/prompts/oasst_ppo_prompts.jsonl"}
    # the prompts PPO trains on and eval holds out are new to the reward model, whose labels come from the pairs' prompts
    read = lambda f: {json.dumps(json.loads(line)["prompt"]) for line in open(REPO / f)}  # noqa: E731
    assert len(read(files["pairs"])) == len(read(files["ppo"])) == 125 and not read(files["pairs"]) & read(files["ppo"])


def test_the_default_recipe_is_the_story_task():
    assert list(read_yaml(REPO / "configs/sft.yaml")["dataset_mixture"]) == ["data/story/sft.jsonl"]
    assert list(read_yaml(REPO / "configs/rm.yaml")["dataset_mixture"]) == ["label-export"]  # labels only
    assert read_yaml(REPO / "configs/pairs.yaml")["prompts_file"] == "data/story/pairs_prompts.jsonl"
    assert read_yaml(REPO / "configs/ppo.yaml")["prompts_file"] == "data/story/ppo_prompts.jsonl"
    assert read_yaml(REPO / "configs/eval.yaml")["gold_judge"] == "sentiment"
    assert read_yaml(REPO / "configs/simulate.yaml")["judge"] == "sentiment"
    ppo = read_yaml(REPO / "configs/ppo.yaml")
    n = sum(1 for _ in open(STORY / "ppo_prompts.jsonl"))
    assert int(n * ppo["heldout_fraction"]) >= 64  # eval's gold win rate needs at least 64 held-out prompts


# ------------------------------------------------------------------------------------------------ the story data

def rows(name):
    return [json.loads(line) for line in open(STORY / name)]


def books():
    """Book name -> its text with whitespace joined, as build.py reads it."""
    return {p.stem: re.sub(r"\s+", " ", p.read_text()) for p in (REPO / "data/pretrain/texts").glob("*.txt")}


def test_story_rows_come_from_the_right_books_and_fit_the_limits():
    from transformers import AutoTokenizer

    heldout = set(read_yaml(REPO / "configs/base.yaml")["heldout_books"])
    texts = books()
    train_text = " ".join(t for name, t in texts.items() if name not in heldout)
    heldout_text = " ".join(t for name, t in texts.items() if name in heldout)
    sft, pair_prompts, ppo_prompts = rows("sft.jsonl"), rows("pairs_prompts.jsonl"), rows("ppo_prompts.jsonl")
    assert len(sft) == 4000 and len(pair_prompts) == len(ppo_prompts) == 413
    pair_texts = {r["prompt"][0]["content"] for r in pair_prompts}
    ppo_texts = {r["prompt"][0]["content"] for r in ppo_prompts}
    assert not pair_texts & ppo_texts  # eval's prompts (from PPO's) are new to the reward model
    rng = random.Random(0)
    for row in rng.sample(sft, 150):  # SFT: sentences of the books the base trained on (a heading between two is skipped)
        user, reply = row["messages"]
        assert user["role"] == "user" and reply["role"] == "assistant"
        for sentence in re.split(r"(?<=[.!?’”\"])\s+(?=[A-Z‘“\"])", f"{user['content']} {reply['content']}"):
            assert sentence in train_text, sentence
        assert user["content"] not in heldout_text
    for text in rng.sample(sorted(pair_texts | ppo_texts), 150):  # prompts: only from the held-out books
        assert text in heldout_text and text not in train_text
    tok = AutoTokenizer.from_pretrained(REPO / "models/tiny")
    ppo_limit = read_yaml(REPO / "configs/ppo.yaml")["max_prompt_length"]
    response_length = read_yaml(REPO / "configs/ppo.yaml")["response_length"]
    for r in rng.sample(pair_prompts + ppo_prompts, 100):
        assert len(tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False)) <= ppo_limit
    for r in rng.sample(sft, 100):
        assert len(tok(r["messages"][1]["content"], add_special_tokens=False)["input_ids"]) < response_length  # + EOS


def story_build():
    sys.path.insert(0, str(STORY))
    try:
        import build
    finally:
        sys.path.remove(str(STORY))
    return build


def test_build_splits_books_and_filters_words(tmp_path, monkeypatch):
    build = story_build()
    from stages.label.config import word_filter

    (tmp_path / "kept.txt").write_text(
        "CHAPTER I.\n\nThe cat sat down by the fire. It was warm and quiet there. The old dog\nbarked loudly at the door. "
        "The end of the day came slowly. Mr. Brown smiled at them all.\n\nThen he left the little house. She waved "
        "goodbye from the garden gate. The sun went down behind the hill. Night came over the quiet town. Everyone "
        "slept soundly until morning.")
    held = "Alice ran fast down the hill. She was very late for tea. The white rabbit waited by the tree. Then the queen shouted."
    (tmp_path / "held.txt").write_text("The Held-out Book\n\n" + held)

    def tok(text, add_special_tokens=False):  # one token per word: limits in words
        return {"input_ids": text.split()}

    files = build.build(tmp_path, ["held"], tok, word_filter(["dog"]))
    assert build.sentences("Mr. Brown smiled. Then he left!") == ["Mr. Brown smiled.", "Then he left!"]
    assert build.paragraphs("Title\nAuthor\n\nCHAPTER I. Down\n\nTHE END\n\nNo.\n\nA real\nline.") == ["No.", "A real line."]
    # window 1 (3 sentences + 2) holds "dog": left out; window 2 is the next 3 sentences and the 2 after them
    assert files["sft.jsonl"] == [{"messages": [
        {"role": "user", "content": "Then he left the little house. She waved goodbye from the garden gate. The sun went "
                                    "down behind the hill."},
        {"role": "assistant", "content": "Night came over the quiet town. Everyone slept soundly until morning."}]}]
    prompts = files["pairs_prompts.jsonl"] + files["ppo_prompts.jsonl"]  # the last sentence alone is under 10 tokens
    assert [r["prompt"][0]["content"] for r in prompts] == [held.rsplit(" Then", 1)[0]]
    assert files["spare"] == []  # SFT takes its one window
    monkeypatch.setattr(build, "SFT_ROWS", 0)  # SFT takes none: its window's opening is spare, as a prompt
    assert build.build(tmp_path, ["held"], tok, word_filter(["dog"]))["spare"] == [
        {"prompt": files["sft.jsonl"][0]["messages"][:1]}]


def test_more_pairs_prompts_are_the_own_openings_then_spare_ones_in_order():
    build = story_build()
    opening = lambda text: {"prompt": [{"role": "user", "content": text}]}  # noqa: E731
    own, spare = [opening("a"), opening("b")], [opening(t) for t in "cdefg"]
    files = {"pairs_prompts.jsonl": own, "spare": spare}
    assert build.more_pairs_prompts(files, 2) == own + spare[:2]
    assert build.more_pairs_prompts(files, 3) == own + spare[:4]
    with pytest.raises(SystemExit, match=r"--more_pairs_prompts 4: only 5 spare openings, 6 needed; ask for at most 3"):
        build.more_pairs_prompts(files, 4)


# ------------------------------------------------------------------------------------------------ the Makefile

def make_dry_run(*args):
    res = subprocess.run(["make", "-n", *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    return res.returncode, [line for line in res.stdout.splitlines() if "-m stages." in line], res.stderr


def make_dry_run_checking_here(*named, variables=()):
    """make_dry_run of the NAMED stages on the fake stages, checked on the real stage modules
    (tests/test_make.py make_n_checked); its lines those of the stages it runs, real or fake."""
    from tests.test_make import make_n_checked

    res = make_n_checked(*named, *variables, check=named)
    lines = [line for line in res.stdout.splitlines() if re.search(r"-m (tests\.fake_)?stages\.", line)]
    return res.returncode, lines, res.stderr


def test_make_default_chain_runs_simulated_labels_before_the_reward_model():
    rc, lines, _ = make_dry_run("sft", "rm", "ppo", "RUN=dryrun-nonexistent")
    assert rc == 0
    stages = [re.search(r"-m (stages\.[\w.]+)", line).group(1) for line in lines]
    # the labels step: is the export current? Pairs of your own labeled (none here: its branch's test is false): export
    # them; new pairs: simulate and export; a changed store (people labeled, or `make simulate` ran): export it again
    assert stages == ["stages.sft", "stages.pairs", "stages.label.fresh_export", "stages.label.export", "stages.simulate",
                      "stages.label.export", "stages.label.export", "stages.rm", "stages.ppo"]
    # the freshness check is given the flags the chain runs simulate with, and simulate runs with exactly those
    simulate_flags = lines[4].split("-m stages.simulate ", 1)[1].split(" && ")[0].strip()
    assert lines[2].endswith(f"fresh_export runs/dryrun-nonexistent -- {simulate_flags} ; fresh=$?; \\"), lines[2]
    assert "--skip_if_people_labeled true" in simulate_flags
    assert "--pairs_dataset" in lines[3] and "--config configs/rm.yaml" in lines[7]


def test_make_recipe_variable_picks_the_assistant_configs():
    rc, lines, _ = make_dry_run_checking_here("sft", "rm", "ppo", "eval",
                                              variables=["RECIPE=assistant", "RUN=dryrun-nonexistent"])
    assert rc == 0 and len(lines) == 4  # no pairs or simulated labels: it trains on the bundled preferences
    for stage, line in zip(("sft", "rm", "ppo", "eval"), lines):
        assert f"--config configs/recipes/assistant/{stage}.yaml" in line and "--run dryrun-nonexistent" in line
    rc, lines, _ = make_dry_run_checking_here("sft", variables=["RECIPE=assistant"])
    assert "--run assistant" in lines[0]  # its own run folder unless RUN says otherwise
    rc, _, err = make_dry_run_checking_here("sft", variables=["RECIPE=nosuch"])
    assert rc != 0 and "RECIPE=nosuch" in err and "assistant" in err


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp"])
def test_the_critic_free_estimators_of_a_recipe_train_on_its_own_prompts(estimator, tmp_path):
    """configs/grpo.yaml (and rloo, reinforce_pp) name configs/ppo.yaml, the story's, as their base: under
    RECIPE=assistant they trained on story openings beside the recipe's PPO on its assistant prompts, and `make eval`
    then refused the two runs' held-out prompts. make gives them the recipe's ppo.yaml as base; the estimator's own
    keys stay; a recipe with a file of its own for the estimator gets it unchanged."""
    rc, lines, _ = make_dry_run_checking_here(estimator, variables=["RECIPE=assistant", "RUN=dryrun-nonexistent"])
    line = lines[-1]
    assert rc == 0 and f"--config configs/{estimator}.yaml" in line
    assert "--base_config configs/recipes/assistant/ppo.yaml" in line
    classes = stage_classes(estimator)
    parsed = parse(classes, ["--config", f"configs/{estimator}.yaml", "--base_config",
                             "configs/recipes/assistant/ppo.yaml"])
    cfg = next(c for c in parsed if hasattr(c, "advantage_estimator"))
    values = {k: v for c in parsed for k, v in vars(c).items()}
    recipe_ppo = read_yaml(REPO / "configs/recipes/assistant/ppo.yaml")
    own = read_yaml(REPO / f"configs/{estimator}.yaml")
    for key, value in recipe_ppo.items():
        if key not in own:
            assert values[key] == value, key
    assert cfg.advantage_estimator == own["advantage_estimator"] and cfg.prompts_file == recipe_ppo["prompts_file"]
    story = next(c for c in parse(classes, ["--config", f"configs/{estimator}.yaml"]) if hasattr(c, "prompts_file"))
    assert story.prompts_file != cfg.prompts_file
    rc, lines, _ = make_dry_run_checking_here(estimator, variables=["RUN=dryrun-nonexistent"])
    assert rc == 0 and "--base_config" not in lines[-1]  # the story recipe: the file's own base
    with pytest.raises(ConfigError, match="--base_config configs/ppo.yaml: configs/ppo.yaml is no variant config"):
        parse(classes, ["--config", "configs/ppo.yaml", "--base_config", "configs/ppo.yaml"])
    assert parse(classes, ["--config", f"configs/{estimator}.yaml", "--base_config=configs/recipes/assistant/ppo.yaml"]) \
        == parsed  # argparse's other spelling, as --config=FILE
    with pytest.raises(ConfigError, match="--base_config is given more than once .*: `make` gives a recipe's ppo.yaml"):
        parse(classes, ["--config", f"configs/{estimator}.yaml", "--base_config", "configs/ppo.yaml",
                        "--base_config", "configs/recipes/assistant/ppo.yaml"])
    # the run's inputs: the base it read, not the story's that the variant file names (editing that one retrained it)
    from pipeline.run import StageRun

    stage = StageRun(estimator, "t", str(tmp_path / "runs"))
    stage.argv = ["--config", f"configs/{estimator}.yaml", "--base_config", "configs/recipes/assistant/ppo.yaml"]
    named = stage._named([stage.argv])
    assert "configs/recipes/assistant/ppo.yaml" in named and "configs/ppo.yaml" not in named
    stage.argv = ["--config", f"configs/{estimator}.yaml"]
    assert "configs/ppo.yaml" in stage._named([stage.argv])


def test_dpo_keeps_the_papers_beta_in_the_assistant_recipe():
    """The story recipe's beta was chosen for the 3M base; the assistant recipe (real checkpoints) keeps 0.1."""
    rc, lines, _ = make_dry_run_checking_here("dpo", variables=["RECIPE=assistant", "RUN=dryrun-nonexistent"])
    assert rc == 0 and "--config configs/recipes/assistant/dpo.yaml" in lines[-1]
    beta = lambda path: next(c.beta for c in parse(stage_classes("dpo"), ["--config", path]) if hasattr(c, "beta"))  # noqa: E731
    assert beta("configs/recipes/assistant/dpo.yaml") == 0.1 and beta("configs/dpo.yaml") == 0.2


def test_each_recipe_shows_annotators_the_guidelines_of_its_own_task():
    """People labeling the story task were shown the assistant task's guidelines (helpful, honest, harmless) while its
    simulated annotators and eval's gold judge prefer the happier continuation: their labels would teach another goal."""
    from stages.label.config import read_guidelines

    rc, lines, _ = make_dry_run("label-export", "RECIPE=assistant", "RUN=dryrun-nonexistent")
    assert rc == 0 and "--config configs/recipes/assistant/label.yaml" in lines[-1]
    shown = lambda path: read_guidelines(next(c for c in parse(stage_classes("label"), ["--config", path])  # noqa: E731
                                              if hasattr(c, "guidelines")).guidelines)
    story, assistant = shown("configs/label.yaml"), shown("configs/recipes/assistant/label.yaml")
    assert "**Happier first.**" in story and "Helpful" not in story
    assert "**Helpful first.**" in assistant and "happier" not in assistant.lower()
