"""Gold judges: a score for each (prompt, response) pair that is NOT the reward model PPO optimises.

    judge = load_judge("sentiment")                      # VADER's compound score of the response, in [-1, 1]
    judge = load_judge("rm:runs/big/rm/adapter")         # another reward model (PEFT adapter or full checkpoint)
    judge = load_judge("mymodule:my_judge")              # your function(prompts, responses) -> list of floats
    scores = judge_scores(judge, prompts, responses)     # batched, every batch checked

A judge is named by one string in a config (`judge:` in configs/simulate.yaml, `gold_judge:` in configs/eval.yaml).
The simulated annotators (stages/simulate.py) label pairs with it, and `make eval` measures the policies with it,
so that learning can be verified by something other than the proxy reward model the policy was trained against.
A function judge receives `prompts` (each a list of chat messages) and `responses` (strings) of one batch and must
return one finite number per response. Everything a judge can get wrong (unknown name, an exception, NaN, the wrong
count) is one ConfigError naming the judge.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.config import ConfigError, function_spec_module, module_source, resolve_path

BUILTIN = ("sentiment",)
FORMS = "sentiment, rm:<reward adapter dir or checkpoint>, or module:function"


@dataclass
class Judge:
    spec: str  # as written in the config
    name: str  # short, for annotator names and report columns: sentiment, rm:<folder>, module:function
    score_batch: Callable[[list, list[str]], list]


def describe_judge(spec: str) -> str:
    """What a judge's scores are, in a few words, for the reports that show them (a gold mean of 0.675 says little
    without its scale)."""
    spec = spec.strip()
    if spec == "sentiment":
        return "VADER's compound sentiment of the reply, from -1, negative, to 1, positive"
    if spec.startswith("rm:"):
        return f"the score the reward model {spec[3:]} gives the reply, on its own scale"
    return f"the score your function {spec} gives the reply"


def sentiment_judge() -> Callable:
    """VADER (Hutto & Gilbert 2014; MIT; its lexicon ships in the wheel, so it works offline): the compound score
    of the response alone, as Ziegler et al. 2019 scored their "positive continuation" task."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise ConfigError("judge 'sentiment' needs the vaderSentiment package: `make setup` installs it "
                          "(pip install -c constraints.txt vaderSentiment)") from None
    analyzer = SentimentIntensityAnalyzer()
    return lambda prompts, responses: [analyzer.polarity_scores(r)["compound"] for r in responses]


def same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def judge_device():
    """Where an rm: judge runs: this process's GPU when there is one (a larger reward model than the policy's, in
    fp32 on the CPU, took minutes per batch), as accelerate picks it (the local rank modulo the GPUs this process
    sees: eval's two ranks on a one-GPU machine share it); the CPU under ACCELERATE_USE_CPU or without a GPU."""
    import torch
    from accelerate.utils import parse_flag_from_env

    if torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def rm_judge(path_text: str, forbidden: list[Path]) -> Callable:
    """A reward model as judge: a PEFT SEQ_CLS adapter (as `make rm` writes it) or a full sequence-classification
    checkpoint with one output, in the dtype it was saved in (a bf16 checkpoint stays bf16), on judge_device(). It
    reads the chat-templated conversation, as RewardTrainer trained it. On the CPU, float32 (as every stage there)."""
    import torch

    path = resolve_path(path_text)
    for own in forbidden:  # PPO's own reward model grading PPO would report the proxy as the gold
        if same_path(path, own) or (path.is_dir() and same_path(path, own.parent) and own.name == "adapter"):
            raise ConfigError(f"judge 'rm:{path_text}' is the reward model this run's PPO optimised ({own}): a gold judge "
                              f"must be independent of it; name another reward model, or use sentiment / module:function")
    require_folder(path_text)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.adapters import pool_in_forward, prompt_part, read_pooling

    untrained, dtype = [], "auto" if judge_device().type == "cuda" else torch.float32
    try:
        if (path / "adapter_config.json").is_file():
            from peft import AutoPeftModelForSequenceClassification

            from pipeline.models import without_load_report

            # Before loading: peft looks up the score head it is told to keep, and raised a bare KeyError without it
            untrained = [] if adapter_has_head(path) else ["score"]
            if not untrained:
                with without_load_report():  # "score.weight MISSING": the base's; the adapter holds the trained head
                    model = AutoPeftModelForSequenceClassification.from_pretrained(str(path), num_labels=1,
                                                                                   dtype=dtype)
        else:
            model, info = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=dtype,
                                                                             output_loading_info=True)
            untrained = [k for k in info["missing_keys"] if k.split(".")[0] in HEAD_NAMES]
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, RuntimeError) as err:
        raise ConfigError(f"judge 'rm:{path_text}' could not be loaded: {str(err).splitlines()[0]}") from None
    if untrained:  # a causal LM (the base, a merged policy) loads with a freshly drawn head: a random judge
        raise ConfigError(f"judge 'rm:{path_text}' has no trained score head ({', '.join(untrained)} would be drawn at "
                          f"random on every load): give a reward model (the rm stage's adapter folder, or a "
                          f"sequence-classification checkpoint)")
    if not getattr(tokenizer, "chat_template", None):  # transformers' own error blamed the run's model profile
        raise ConfigError(f"judge 'rm:{path_text}' has no chat template (its tokenizer's chat_template is not set), and "
                          f"it reads each prompt and reply as a templated conversation: save the template it was "
                          f"trained with beside it (tokenizer.chat_template = ...; tokenizer.save_pretrained), or use "
                          f"a judge of your own (module:function)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id  # the adapter does not carry it
    pooling = read_pooling(path)  # as `make rm` trained it (score_pooling.json; stock: last token)
    pool_in_forward(model, pooling)
    model.to(judge_device()).eval()

    @torch.no_grad()
    def score(prompts, responses):
        from pipeline.generation import chat_reward_inputs

        ids, mask, starts = chat_reward_inputs(tokenizer, [as_messages(p) for p in prompts], list(responses))
        device = model.device
        scores = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].float()
        if pooling == "sum":  # the reply's sum: the whole conversation's less the prompt's (pipeline.adapters.prompt_part)
            prompt_ids, prompt_mask = prompt_part(ids, mask, starts, tokenizer.pad_token_id)
            scores -= model(input_ids=prompt_ids.to(device), attention_mask=prompt_mask.to(device)).logits[:, 0].float()
        return scores.cpu().tolist()

    return score


HEAD_NAMES = ("score", "classifier")  # a sequence-classification model's head, by the name transformers gives it


def adapter_has_head(folder: Path) -> bool:
    """Whether a peft adapter carries its own score head (modules_to_save, as `make rm` saves it)."""
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        return True  # a .bin adapter: not inspected here (peft loads it, or fails with its own error)
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        return any(part in HEAD_NAMES for key in f.keys() for part in key.split("."))


def function_judge(spec: str) -> Callable:
    module_name, _, function_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        parts = module_name.split(".")  # the module or a package above it not found: the path is the fix
        missing = getattr(err, "name", None) in {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        fix = f"; {PATH_FIX.format(module_name.replace('.', '/'))}" if missing else ""
        raise ConfigError(f"judge '{spec}': cannot import module '{module_name}' ({err}){fix}; judges are {FORMS}") \
            from None
    except Exception as err:  # the module itself fails as it is imported (a missing key, a syntax error)
        raise ConfigError(f"judge '{spec}': importing module '{module_name}' failed: {type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"judge '{spec}': module '{module_name}' has no function '{function_name}'")
    return function


def require_folder(path_text: str) -> None:
    path = resolve_path(path_text)
    if not path.is_dir():
        raise ConfigError(f"judge 'rm:{path_text}': {path} is not a folder; give a reward adapter folder (with "
                          f"adapter_config.json) or a sequence-classification checkpoint")


def judge_kind(spec: str) -> tuple[str, str]:
    """(sentiment | rm | function, what follows) for a judge's spec, without loading anything; unknown forms refused."""
    spec = (spec or "").strip()
    if spec in BUILTIN:
        return spec, spec
    if spec.startswith("rm:") and spec[3:].strip():
        return "rm", spec[3:].strip()
    if function_spec_module(spec):
        return "function", spec
    raise ConfigError(f"unknown judge '{spec}': name one of {FORMS}")


# Where Python looks for a judge's module: the working directory (the repository, under make) and PYTHONPATH.
PATH_FIX = "put the folder that holds {}.py on PYTHONPATH (PYTHONPATH=/path/to/that/folder make ...)"


def check_judge_spec(spec: str) -> None:
    """What a spec alone can tell (make checks it before any stage runs): its form, an rm: judge's folder, and that a
    `module:function` judge's module is on the Python path (found, not imported: no one's code runs at the check)."""
    kind, rest = judge_kind(spec)
    if kind == "rm":
        require_folder(rest)
    if kind == "function":
        module_name = rest.partition(":")[0]
        if module_source(rest) is None and importlib.util.find_spec(module_name.split(".")[0]) is None:
            raise ConfigError(f"judge '{rest}': no module '{module_name}' on the Python path: "
                              f"{PATH_FIX.format(module_name.replace('.', '/'))}")


def load_judge(spec: str, forbidden_rm: list[str | Path] = ()) -> Judge:
    """The judge a config names. `forbidden_rm`: the reward model(s) the run's PPO optimised; refused as judges."""
    kind, rest = judge_kind(spec)
    if kind == "rm":
        return Judge(spec.strip(), f"rm:{Path(rest).name or rest}", rm_judge(rest, [Path(p) for p in forbidden_rm]))
    if kind == "function":
        return Judge(rest, rest, function_judge(rest))
    return Judge(rest, rest, sentiment_judge())


def as_messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]


MAX_SCORE = 1e100  # squared (a standard deviation) still inside float's 1.8e308


def finite_score(value) -> bool:
    """A real number that is a finite float: not a bool (True would count as 1.0), nan or inf, nor an int past
    float's range (10**400, which math.isfinite itself cannot take)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def judge_scores(judge: Judge, prompts: list, responses: list[str], batch_size: int = 64) -> list[float]:
    """Score every (prompt, response), `batch_size` at a time; a batch that raises, returns the wrong number of
    scores, or a score that is not a finite number, is one ConfigError naming the judge and the first bad row."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    out: list[float] = []
    for start in range(0, len(responses), batch_size):
        batch_p, batch_r = prompts[start:start + batch_size], responses[start:start + batch_size]
        try:
            got = judge.score_batch(batch_p, batch_r)
        except ConfigError:
            raise
        except Exception as err:  # a user's function can fail in any way; say which judge and where
            raise ConfigError(f"judge '{judge.spec}' failed on rows {start}-{start + len(batch_r) - 1}: "
                              f"{type(err).__name__}: {err}") from None
        if hasattr(got, "tolist"):  # a tensor or an array
            got = got.tolist()
        if not isinstance(got, (list, tuple)):  # a dict would give its keys, a set an order of its own
            raise ConfigError(f"judge '{judge.spec}' returned a {type(got).__name__} for rows {start}-"
                              f"{start + len(batch_r) - 1}: it must return a list of scores, one per response, in order")
        if len(got) != len(batch_r):
            raise ConfigError(f"judge '{judge.spec}' returned {len(got)} scores for a batch of {len(batch_r)} "
                              f"responses (rows {start}-{start + len(batch_r) - 1}): it must return one per response")
        for i, value in enumerate(got):
            if not finite_score(value):
                shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:39] + "…"  # 10**400: 401 digits
                raise ConfigError(f"judge '{judge.spec}' gave {shown} for row {start + i}: every score must be a "
                                  f"finite number")
            if abs(float(value)) > MAX_SCORE:  # finite, but the means and their squares pass float's range
                raise ConfigError(f"judge '{judge.spec}' gave {float(value):g} for row {start + i}: scores beyond "
                                  f"±{MAX_SCORE:g} overflow eval's means and intervals; scale the judge's scores down")
        out += [float(v) for v in got]
    return out
