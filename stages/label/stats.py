"""Label statistics: pure functions over the store's label rows (unit-tested against hand-computed numbers).

Agreement is measured on what a label *means* (response 0 wins, response 1 wins, tie, both bad), not on the side
clicked, since each annotator saw their own left/right order.
"""

from __future__ import annotations

import html
import math
import time
from collections import Counter, defaultdict
from itertools import combinations

from stages.label.store import SIMULATED_PREFIX, is_simulated


def category(label: dict) -> str:
    """'0' or '1' (the winning response), 'tie' or 'both_bad'."""
    return str(label["preferred"]) if label["preferred"] is not None else label["choice"]


def cohen_kappa(a: list, b: list) -> float | None:
    """Cohen's kappa of two raters over the same items (Cohen 1960). None when chance agreement is total."""
    if len(a) != len(b) or not a:
        return None
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    expected = sum(ca[k] * cb[k] for k in set(ca) | set(cb)) / n**2
    if expected == 1:
        return None
    return (observed - expected) / (1 - expected)


def krippendorff_alpha(units: list[list]) -> float | None:
    """Krippendorff's alpha, nominal level, any number of raters, missing values allowed (Krippendorff 2011).

    `units`: one list of values per item; items with fewer than two values carry no information and are ignored.
    alpha = 1 - (n - 1) * sum_{c != k} o_ck / sum_{c != k} n_c n_k, with o the coincidence matrix.
    """
    coincidence: Counter = Counter()
    for values in units:
        m = len(values)
        if m < 2:
            continue
        for i, j in ((i, j) for i in range(m) for j in range(m) if i != j):
            coincidence[(values[i], values[j])] += 1 / (m - 1)
    n_c: Counter = Counter()
    for (c, _), w in coincidence.items():
        n_c[c] += w
    n = sum(n_c.values())
    disagree = sum(w for (c, k), w in coincidence.items() if c != k)
    expected = sum(n_c[c] * n_c[k] for c in n_c for k in n_c if c != k)
    if n <= 1 or expected == 0:
        return None
    return 1 - (n - 1) * disagree / expected


def binomial_two_sided_p(k: int, n: int) -> float:
    """P(a fair coin gives a result at least as far from n/2 as k): is the left side winning more than chance?"""
    if n == 0:
        return 1.0
    if n > 1000:  # normal approximation; exact sums of huge binomials are slow and unneeded
        z = abs(k - n / 2) / math.sqrt(n / 4)
        return math.erfc(z / math.sqrt(2))
    probs = [math.comb(n, i) / 2**n for i in range(n + 1)]
    return min(1.0, sum(p for p in probs if p <= probs[k] * (1 + 1e-9)))


def human_vs_simulated(labels: list[dict]) -> dict | None:
    """How often people and simulated annotators agree, on pairs that both labeled: the share of (person, simulator)
    label pairs on the same pair that mean the same (same winner, or both tie, or both 'both bad'), and the pairs
    that went into it. None when no pair has a label from each."""
    per_pair: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for lab in labels:
        per_pair[lab["pair_id"]][is_simulated(lab["annotator"])].append(category(lab))
    both = [(people, sims) for people, sims in per_pair.values() if people and sims]
    if not both:
        return None
    same = [h == s for people, sims in both for h in people for s in sims]
    return {"pairs": len(both), "comparisons": len(same), "agreement": round(sum(same) / len(same), 3)}


def summarize(labels: list[dict], now: float | None = None) -> dict:
    """Everything the stats view shows, from the store's label rows."""
    now = time.time() if now is None else now
    by_annotator: dict[str, list[dict]] = defaultdict(list)
    for lab in labels:
        by_annotator[lab["annotator"]].append(lab)
    annotators = {}
    for name, labs in sorted(by_annotator.items()):
        times = sorted(lab["created_at"] for lab in labs)
        span_h = (times[-1] - times[0]) / 3600
        annotators[name] = {
            "labels": len(labs),
            "labels_per_hour": round(len(labs) / span_h, 1) if span_h >= 1 / 60 else None,  # below a minute: no rate
            "last_hour": sum(now - t <= 3600 for t in times),
        }
    hours = Counter(time.strftime("%Y-%m-%d %H:00", time.localtime(lab["created_at"])) for lab in labels)
    choices = Counter(lab["choice"] for lab in labels)
    sided = choices["left"] + choices["right"]

    per_pair: dict[str, dict[str, str]] = defaultdict(dict)
    for lab in labels:
        per_pair[lab["pair_id"]][lab["annotator"]] = category(lab)
    shared = {p: v for p, v in per_pair.items() if len(v) >= 2}
    together: dict[tuple[str, str], list[str]] = defaultdict(list)  # two annotators -> the pairs both labeled
    for p, v in shared.items():  # each pair's own annotators: a scan of every pair for every two annotators took
        for x, y in combinations(sorted(v), 2):  # 2 minutes on 50,000 pairs of 200 annotators
            together[(x, y)].append(p)
    kappas = {}
    for (x, y), common in sorted(together.items()):
        if len(common) >= 2:
            k = cohen_kappa([shared[p][x] for p in common], [shared[p][y] for p in common])
            if k is not None:
                kappas[f"{x} / {y}"] = {"kappa": round(k, 3), "items": len(common)}
    alpha = krippendorff_alpha([list(v.values()) for v in shared.values()])
    return {
        "labels": len(labels),
        "annotators": annotators,
        "per_hour": dict(sorted(hours.items())[-24:]),
        "choices": {c: choices[c] for c in ("left", "right", "tie", "both_bad")},
        "position_bias": {
            "left_wins": choices["left"], "decided": sided,
            "left_share": round(choices["left"] / sided, 3) if sided else None,
            "p_value": round(binomial_two_sided_p(choices["left"], sided), 4) if sided else None,
        },
        "agreement": {
            "pairs_with_several_labels": len(shared),
            "krippendorff_alpha": round(alpha, 3) if alpha is not None else None,
            "cohen_kappa": kappas,
            "mean_cohen_kappa": round(sum(k["kappa"] for k in kappas.values()) / len(kappas), 3) if kappas else None,
        },
        "human_vs_simulated": human_vs_simulated(labels),
    }


def stats_view(labels: list[dict], now: float | None = None) -> dict:
    """The Stats tab's figures: people's labels summarised, the simulated annotators' counted beside them. The tab
    watches over people (their pace, position bias, agreement), and `make simulate`'s three labels on every pair
    would swamp those figures: 30 of 30 clicks for the left side beside 600 simulated labels read as no bias."""
    people = [lab for lab in labels if not is_simulated(lab["annotator"])]
    simulated = Counter(lab["annotator"] for lab in labels if is_simulated(lab["annotator"]))
    return {**summarize(people, now), "human_vs_simulated": human_vs_simulated(labels),
            "simulated": {"labels": sum(simulated.values()), "annotators": sorted(simulated)}}


def _table(header: list[str], rows: list[list], numeric_from: int = 1) -> str:
    """An HTML table with every cell escaped: annotator names are logins or typed names, i.e. user text."""
    def cell(tag, i, v):
        align = ' style="text-align:right"' if i >= numeric_from else ""
        return f"<{tag}{align}>{html.escape(str(v))}</{tag}>"
    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def to_html(s: dict, overlap: int, blocked: int = 0) -> str:
    """The stats view, as HTML whose only markup is ours (names and numbers are escaped)."""
    e = html.escape
    sim = s.get("simulated") or {"labels": 0}
    sim_line = (f"<p><b>Simulated annotators</b> ({e(', '.join(sim['annotators']))}): {sim['labels']} labels, not "
                f"counted above.</p>" if sim["labels"] else "")
    # Said before any label too: a store whose every pair is held back serves nothing, and this line says why.
    held_back = f"<p>{blocked} pair(s) are held back from annotators by the word filter.</p>" if blocked else ""
    if not s["labels"]:
        nothing_yet = "<p>No labels from people yet.</p>\n" + sim_line if sim["labels"] else "<p>No labels yet.</p>"
        return "\n".join(filter(None, [nothing_yet, held_back]))
    parts = [f"<p><b>{s['labels']} labels</b> from {len(s['annotators'])} annotator(s).</p>",
             _table(["annotator", "labels", "labels / hour", "in the last hour"],
                    [[name, a["labels"], a["labels_per_hour"] if a["labels_per_hour"] is not None else "–",
                      a["last_hour"]] for name, a in s["annotators"].items()]),
             "<p><b>Labels per hour</b> (last 24 hours with labels)</p>",
             _table(["hour", "labels"], [[h, n] for h, n in s["per_hour"].items()])]
    total = s["labels"]
    names = {"left": "left better", "right": "right better", "tie": "tie", "both_bad": "both bad"}
    parts += ["<p><b>Choices</b></p>",
              _table(["choice", "labels", "share"], [[names[c], n, f"{n / total:.0%}"] for c, n in s["choices"].items()])]
    pb = s["position_bias"]
    if pb["decided"]:
        parts.append(f"<p><b>Position bias</b>: the left side won {pb['left_wins']} of {pb['decided']} decided labels "
                     f"({pb['left_share']:.0%}; 50% expected, two-sided binomial p = {pb['p_value']}).</p>")
    ag = s["agreement"]
    parts.append("<p><b>Agreement</b></p>")
    if overlap < 2 and ag["pairs_with_several_labels"] == 0:
        parts.append("<p>Overlap is 1 (each pair gets one annotator): set <code>overlap: 2</code> or more to measure "
                     "agreement.</p>")
    elif ag["pairs_with_several_labels"] == 0:
        parts.append("<p>No pair has two labels yet.</p>")
    else:
        alpha = ag["krippendorff_alpha"] if ag["krippendorff_alpha"] is not None else "undefined (no variation)"
        kappa = ag["mean_cohen_kappa"] if ag["mean_cohen_kappa"] is not None else "–"
        parts.append(f"<p>{ag['pairs_with_several_labels']} pairs with 2+ labels. Krippendorff's alpha (nominal): "
                     f"{e(str(alpha))}. Mean pairwise Cohen's kappa: {kappa}.</p>")
        if ag["cohen_kappa"]:
            parts.append(_table(["annotators", "Cohen's kappa", "shared pairs"],
                                [[k, v["kappa"], v["items"]] for k, v in ag["cohen_kappa"].items()]))
    hs = s.get("human_vs_simulated")
    if hs:
        parts.append(f"<p><b>People vs simulated annotators</b> (<code>{html.escape(SIMULATED_PREFIX)}...</code>): "
                     f"{hs['agreement']:.0%} agreement on {hs['pairs']} pairs labeled by both "
                     f"({hs['comparisons']} label pairs).</p>")
    if sim_line:
        parts.append(sim_line)
    if held_back:
        parts.append(held_back)
    return "\n".join(parts)
