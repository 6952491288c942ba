"""Judge functions for the tests of pipeline/judges.py (`module:function` judges): good ones and broken ones."""

CALLS: list[int] = []  # batch sizes seen by counting_judge


def length_judge(prompts, responses):
    """One score per response: its length in characters."""
    return [float(len(r)) for r in responses]


def counting_judge(prompts, responses):
    CALLS.append(len(responses))
    return [float(len(p[-1]["content"])) for p in prompts]


def raising_judge(prompts, responses):
    raise RuntimeError("the grader is on holiday")


def nan_judge(prompts, responses):
    return [float("nan")] + [0.0] * (len(responses) - 1)


def short_judge(prompts, responses):
    return [1.0] * (len(responses) - 1)


def long_judge(prompts, responses):
    return [1.0] * (len(responses) + 1)


def text_judge(prompts, responses):
    return ["good"] * len(responses)


def dict_judge(prompts, responses):
    """Scores keyed by row: list() of it would be the keys 0, 1, ..., numbers that pass every other check."""
    return {i: 0.9 for i in range(len(responses))}


def set_judge(prompts, responses):
    return {float(i) for i in range(len(responses))}


def array_judge(prompts, responses):
    import numpy as np

    return np.array([len(r) for r in responses], dtype=np.float32)


NOT_A_FUNCTION = 3


LEXICON = {"it": 0.0, "was": 0.0, "a": 0.0, "lovely": 1.0, "dreadful": -1.0, "day": 0.0}


def lexicon_judge(prompts, responses):
    """Fine on eval's two trial rows ("It was a lovely day.", "It was a dreadful day."), a KeyError on other words."""
    return [sum(LEXICON[w.strip(".,!?").lower()] for w in r.split()) for r in responses]
