"""Stage: simulated annotators label the run's pairs through the same label store people use (`make label`).

    make simulate                     # python -m stages.simulate --config configs/simulate.yaml --run $(RUN)
    make simulate ARGS="--judge rm:runs/big/rm/adapter --position_bias 0.3"

A simulated annotator stands in for people: it labels each pair of the pairs stage by a gold judge
(pipeline/judges.py; VADER sentiment by default) with human-like noise, under the name `sim:<judge>`, through the
store's own API (save_label, with the left/right order the store shows that annotator). Stats, agreement and
`make label-export` then treat it like a person, and people can label the same store (`make label`: a simulator's
labels take no person's place in `overlap`); the Stats tab shows how often people and simulators agree.

Noise model (Bradley-Terry, as people's choices are modelled in RLHF reward training): with the judge's scores
s_left, s_right of the two responses as shown, the annotator says "tie" when |s_left - s_right| < tie_band, else
picks left with probability sigmoid((s_left - s_right) / temperature + position_bias). The draw for a pair is a
hash of (seed, annotator, pair_id): the same labels whatever the order or the batch. temperature: null calibrates
it so that the expected agreement with the gold ordering is target_agreement (0.73: trained labelers agreed with
each other 72.6% of the time in Ouyang et al. 2022, 72-77% in Stiennon et al. 2020).

annotators: N > 1 simulated annotators (sim:<judge>-1 ... -N) label every pair, each with its own draws: the overlap a
labeling team uses to catch noise. label-export then keeps the majority's choice, as it does for people.

Writes labels into runs/<run>/label/labels.sqlite, and runs/<run>/simulate/: gold_scores.jsonl (the judge's score of
every response), config.json, manifest.json (last; metrics: agreement with the gold ordering achieved, and more).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass, field

from pipeline.config import REPO_ROOT, ConfigError, RunArgs, parse, resolve_path, to_dict
from pipeline import stats
from pipeline.run import StageRun, main_guard, stage_dir


@dataclass
class SimulateArgs:
    # Who
    judge: str = field(default="sentiment", metadata={"help": "Gold judge: sentiment, rm:<adapter or checkpoint>, module:function."})
    annotator: str = field(default="", metadata={"help": "Annotator name in the store; '' = sim:<judge name>. Must start with sim:."})
    annotators: int = field(default=1, metadata={
        "help": "Simulated annotators per pair (N > 1: <name>-1 ... <name>-N, independent draws; export takes the majority)."})
    # Noise model
    temperature: float | None = field(default=None, metadata={
        "help": "Bradley-Terry temperature on the score difference (judge units); null = calibrate to target_agreement."})
    target_agreement: float = field(default=0.73, metadata={
        "help": "With temperature null: the expected share of decided labels that pick the judge's winner."})
    tie_band: float = field(default=0.05, metadata={"help": "A score difference below this (judge units) is labeled a tie."})
    position_bias: float = field(default=0.0, metadata={"help": "Added to the logit of choosing the left response (0 = none)."})
    seed: int = field(default=0, metadata={"help": "Seeds every draw (with the annotator and pair id)."})
    # Data
    pairs_dataset: str | None = field(default=None, metadata={"help": "Pairs to label; default: this run's pairs stage."})
    label_config: str = field(default="configs/label.yaml", metadata={
        "help": "The labeling UI's config: the same word filter and left/right seed as people get."})
    skip_if_people_labeled: bool = field(default=False, metadata={
        "help": "Label nothing when the store already holds labels from people (the default chain of make rm)."})
    batch_size: int = field(default=64, metadata={"help": "Responses per judge call."})

    def inert_settings(self, parsed: list) -> dict[str, str]:
        """What pipeline.config.parse refuses on the command line: target_agreement beside a given temperature."""
        if self.temperature is None:
            return {}
        return {"target_agreement": f"temperature {self.temperature:g} is given, and target_agreement only calibrates "
                                    f"a null one: give one of the two"}

    def __post_init__(self):
        if self.temperature is not None and self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0 (or null to calibrate it), got {self.temperature}")
        if not 0.5 < self.target_agreement < 1:
            raise ConfigError(f"target_agreement must be between 0.5 (a coin) and 1 (no noise), got {self.target_agreement}")
        if self.annotators < 1:
            raise ConfigError(f"annotators must be >= 1, got {self.annotators}")
        if self.tie_band < 0:
            raise ConfigError(f"tie_band must be >= 0, got {self.tie_band}")
        if self.annotator and not self.annotator.startswith("sim:"):
            raise ConfigError(f"annotator '{self.annotator}' must start with 'sim:' so that stats and exports can tell "
                              f"simulated labels from people's")


# ---------------------------------------------------------------------------------------------------- noise model

def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def uniform(seed: int, annotator: str, pair_id: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, annotator, pair): labels do not depend on the labeling order."""
    digest = hashlib.sha256(f"{seed}\0{annotator}\0{pair_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def p_left(diff: float, temperature: float, position_bias: float) -> float:
    """Bradley-Terry probability of picking the left response; diff = s_left - s_right."""
    return sigmoid(diff / temperature + position_bias)


def choose(diff: float, u: float, temperature: float, tie_band: float, position_bias: float) -> str:
    """'left', 'right' or 'tie' for a pair whose left response scores `diff` more than the right one."""
    if abs(diff) < tie_band:
        return "tie"
    return "left" if u < p_left(diff, temperature, position_bias) else "right"


def expected_agreement(diffs: list[float], temperature: float, position_bias: float) -> float:
    """Expected share of labels that pick the gold winner, over pairs outside the tie band (|diffs|), each pair shown
    with the gold winner on the left or the right with even odds (the store's order is a hash of the pair)."""
    probs = [(p_left(abs(d), temperature, position_bias) + p_left(abs(d), temperature, -position_bias)) / 2 for d in diffs]
    return sum(probs) / len(probs)


def calibrate_temperature(diffs: list[float], target: float, position_bias: float) -> float:
    """The temperature whose expected agreement is `target` (bisection in log space: agreement falls as T rises)."""
    if not diffs:
        raise ConfigError("no pair has a score difference outside tie_band: the judge cannot tell these responses apart "
                          "(lower tie_band, or give a temperature)")
    lo, hi = math.log(1e-6), math.log(1e6)
    if expected_agreement(diffs, math.exp(lo), position_bias) < target:
        raise ConfigError(f"target_agreement {target} is out of reach with position_bias {position_bias}: lower one of them")
    for _ in range(100):
        mid = (lo + hi) / 2
        if expected_agreement(diffs, math.exp(mid), position_bias) > target:
            lo = mid
        else:
            hi = mid
    return math.exp((lo + hi) / 2)


def wilson(k: float, n: int) -> list[float]:
    return [round(x, 4) for x in stats.wilson(k, n)]


def agreement_with_gold(labels: list[dict], scores: dict[str, list[float]], tie_band: float) -> dict:
    """Of the labels on pairs whose gold scores differ by tie_band or more, the share that picked the gold winner
    (ties, both bad: not decided, counted apart). What people's agreement figures measure, here against the gold."""
    decided = agree = ties = 0
    for lab in labels:
        s = scores.get(lab["pair_id"])
        if s is None or abs(s[0] - s[1]) < max(tie_band, 1e-12):
            continue
        if lab["preferred"] is None:
            ties += 1
            continue
        decided += 1
        agree += lab["preferred"] == (0 if s[0] > s[1] else 1)
    return {"agreement_with_gold": round(agree / decided, 4) if decided else None,
            "agreement_with_gold_ci95": wilson(agree, decided), "decided_labels": decided, "tie_labels_on_unequal": ties}


def majority_agreement_with_gold(labels: list[dict], scores: dict[str, list[float]], tie_band: float) -> dict:
    """With several annotators on a pair: how often the majority label-export keeps (its own aggregate(): ties and
    both-bad outcomes dropped, no majority dropped) picks the gold winner, over pairs whose gold scores differ by
    tie_band or more."""
    from stages.label.export import aggregate

    rows, _ = aggregate(labels)
    responses = {lab["pair_id"]: lab["responses"] for lab in labels}
    decided = agree = 0
    for row in rows:
        s = scores.get(row["pair_id"])
        if s is None or abs(s[0] - s[1]) < max(tie_band, 1e-12):
            continue
        decided += 1
        agree += (0 if row["chosen"][0]["content"] == responses[row["pair_id"]][0] else 1) == (0 if s[0] > s[1] else 1)
    return {"majority_agreement_with_gold": round(agree / decided, 4) if decided else None,
            "majority_agreement_with_gold_ci95": wilson(agree, decided), "majority_decided_pairs": decided}


# ---------------------------------------------------------------------------------------------------- the stage

def simulator_store(path, **kwargs):
    """The label store, tuned for a machine that labels thousands of pairs a minute. People's labels must survive a
    power cut (each commit fsyncs: synchronous=FULL); simulated ones are redrawn identically by a rerun. And the store
    opens a connection per call: closing the last one checkpoints the WAL (more fsyncs), ~12 ms a label here. So the
    simulator commits without the fsync and holds one extra connection open while it labels (`keepalive`; close it).
    Everything else (schema, assignment, the label rows and their history) is the store's own."""
    from stages.label.store import LabelStore

    class SimulatorStore(LabelStore):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self.keepalive = self._connect()

        def _connect(self):
            con = super()._connect()
            con.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: still atomic, and safe if the process dies
            return con

    return SimulatorStore(path, **kwargs)


def load_label_args(path: str):
    from stages.label.config import LabelArgs

    config = resolve_path(path)
    if not config.is_file():  # parse's own error would name --config, the flag of this stage's own config
        raise ConfigError(f"label config {config} does not exist: pass --label_config with a path to a YAML file "
                          f"(configs/label.yaml by default)")
    (label_args,) = parse((LabelArgs,), ["--config", str(config)])  # its keys, types and ranges, as `make label`'s
    return label_args


def people_labeled(db, pair_ids: set[str]) -> bool:
    """Whether people labeled any of these pairs: the export's `sources: auto` then takes theirs. Labels of other pairs
    (eval's SFT-vs-PPO pairs, an earlier pairs dataset) do not count: the export leaves them out."""
    from stages.label.store import LabelStore, is_simulated

    return db.is_file() and any(not is_simulated(lab["annotator"]) and lab["pair_id"] in pair_ids
                                for lab in LabelStore(db).labels(with_text=False))


def own_prompts(pairs_manifest: dict | None) -> str | None:
    """The prompts the pairs were sampled for, when they are not the story recipe's (your --dataset_name or
    prompts_file); None for the story openings or pairs given another way."""
    settings = ((pairs_manifest or {}).get("config") or {}).get("pairs") or {}
    source = settings.get("dataset_name") or settings.get("prompts_file") or ""
    story = (REPO_ROOT / "data" / "story").resolve()
    return source if source and story not in resolve_path(str(source)).resolve().parents else None


def main(args: SimulateArgs, run: RunArgs) -> dict:
    from pipeline.judges import judge_scores, load_judge
    from pipeline.report import print_table
    from stages.label.__main__ import load_pairs
    from stages.label.config import db_path, word_filter
    from stages.label.store import LabelStore, is_simulated, lock_store

    stage = StageRun("simulate", run.run, run.runs_dir)
    config = {"simulate": to_dict(args), "run": to_dict(run)}
    db = db_path(run.runs_dir, run.run)

    # 1. Everything that can be wrong is checked before the store or the run folder is touched.
    label_args = load_label_args(args.label_config)
    label_args.pairs_dataset = args.pairs_dataset
    pairs = load_pairs(label_args, stage)
    if db.is_file():
        LabelStore(db).check_labeled_text(pairs)
    if args.skip_if_people_labeled and people_labeled(db, {p["pair_id"] for p in pairs}):
        print(f"simulate: {db} holds labels from people on these pairs: they are used, no simulated labels added "
              f"(`make simulate` adds them anyway)")
        return {"skipped": "people labeled"}
    rm_dir = stage_dir(run.runs_dir, run.run, "rm")  # the run's reward model, every member of an ensemble
    judge = load_judge(args.judge, forbidden_rm=[rm_dir / "adapter", *sorted(rm_dir.glob("member-*/adapter"))])
    annotator = args.annotator or f"sim:{judge.name}"
    if "," in annotator:  # the label export lists a pair's annotators comma-separated: a part would pass for a person
        raise ConfigError(f"annotator '{annotator}' holds a comma, which parts a pair's annotators in the label export: "
                          f"name the simulator without one (--annotator sim:...)")
    own = own_prompts(stage.upstream.get("pairs"))
    if own and judge.name == "sentiment":
        print(f"note: the simulated annotators judge the replies to these prompts ({own}) by sentiment, happier is "
              f"better: the gold of the story task. For your own task label them yourself (`make label`), or give "
              f"SIMULATE_ARGS=\"--judge module:function\" (and eval's --gold_judge) a judge of it", file=sys.stderr)
    flat_prompts = [p["prompt"] for p in pairs for _ in (0, 1)]
    flat_scores = judge_scores(judge, flat_prompts, [r for p in pairs for r in p["responses"]], args.batch_size)
    scores = {p["pair_id"]: flat_scores[2 * i:2 * i + 2] for i, p in enumerate(pairs)}

    # 2. The noise model's temperature: given, or calibrated on these pairs' score differences
    outside = [abs(s[0] - s[1]) for s in scores.values() if abs(s[0] - s[1]) >= max(args.tie_band, 1e-12)]
    temperature = args.temperature or calibrate_temperature(outside, args.target_agreement, args.position_bias)
    lock = lock_store(db, then="stop it before `make simulate` (the simulators import the run's pairs into the "
                               "store, which would take other pairs away from the people labeling)")
    stage.prepare(config)

    # 3. Label like a person: each pair the store serves (word filter included), answered in the left/right order the
    #    store shows this annotator. A simulator labels every pair once, however many people labeled it (overlap is
    #    for sharing work among people). The store holds the labels of the settings given last: a rerun with the same
    #    ones writes nothing (every draw is fixed by seed, annotator and pair), one with other noise settings redraws
    #    the labels they change, and one with fewer or other annotators (another name, another judge) removes every
    #    simulated annotator's labels not named now, since the export would count them in one majority with these.
    #    A pair the word filter holds back now (a word added to offensive_words) loses its simulated labels, as a
    #    fresh run would not have drawn them. People's labels are never touched.
    store = simulator_store(db, overlap=len(pairs) + 10**6, lease_s=label_args.lease_timeout_s, seed=label_args.seed)
    store.import_items(pairs, word_filter(label_args.offensive_words if label_args.filter_offensive else []))
    names = [annotator] if args.annotators == 1 else [f"{annotator}-{i}" for i in range(1, args.annotators + 1)]
    stored = {(lab["annotator"], lab["pair_id"]): (lab["choice"], lab["shown_left"]) for lab in store.labels()}
    gone = sorted({other for other, _ in stored if is_simulated(other)} - set(names))
    servable = store.servable_pairs()
    labels, written, changed = [], 0, 0
    for name in names:
        for pair_id in servable:
            left = store.shown_left(pair_id, name)
            diff = scores[pair_id][left] - scores[pair_id][1 - left]
            choice = choose(diff, uniform(args.seed, name, pair_id), temperature, args.tie_band, args.position_bias)
            before = stored.get((name, pair_id))
            if before != (choice, left):
                labels.append((name, pair_id, choice, left))
                written += before is None
                changed += before is not None
    blocked = set(store.blocked_pairs())
    withdraw = sorted((name, pair_id) for name, pair_id in stored if name in names and pair_id in blocked)
    removed = store.save_simulated(gone, labels, withdraw)  # one transaction: a run killed before it changes nothing

    # 4. What was achieved, from the store itself (a rerun with the same settings reports the same)
    mine = [lab for lab in store.labels() if lab["annotator"] in names and lab["pair_id"] in scores]
    store.keepalive.close()
    lock.close()
    with open(stage.dir / "gold_scores.jsonl", "w") as f:
        for p in pairs:
            f.write(json.dumps({"pair_id": p["pair_id"], "scores": scores[p["pair_id"]]}) + "\n")
    decided = [lab for lab in mine if lab["choice"] in ("left", "right")]
    metrics = {
        "annotator": annotator, "annotators": len(names), "judge": args.judge, "pairs": len(pairs),
        "labels_written": written, "labels_redrawn": changed, "labels_removed": removed, "labels": len(mine),
        **agreement_with_gold(mine, scores, args.tie_band),
        **(majority_agreement_with_gold(mine, scores, args.tie_band) if len(names) > 1 else {}),
        "expected_agreement": round(expected_agreement(outside, temperature, args.position_bias), 4) if outside else None,
        "temperature": temperature, "temperature_calibrated": args.temperature is None,
        "tie_share": round(sum(lab["choice"] == "tie" for lab in mine) / len(mine), 4) if mine else None,
        "left_share": round(sum(lab["choice"] == "left" for lab in decided) / len(decided), 4) if decided else None,
        "gold_mean": round(sum(flat_scores) / len(flat_scores), 4),
    }
    print_table("simulate", metrics)
    stage.finish({"labels_sqlite": db, "gold_scores": stage.dir / "gold_scores.jsonl"}, metrics, config)
    return metrics


def CONFIG_CLASSES():
    return (SimulateArgs, RunArgs)


if __name__ == "__main__":
    main_guard(lambda: main(*parse(CONFIG_CLASSES())))
