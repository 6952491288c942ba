"""`make eval`'s plots: PPO's training curves, the SFT-vs-PPO distributions, the over-optimisation curve of one
RL run, and the comparison of every policy (gold score against sqrt(KL to SFT)). Written headless (Agg)."""

from __future__ import annotations

import statistics
from pathlib import Path

TRAINING_CURVES = [  # (metrics.jsonl keys, panel title): one panel each, first key solid, others dashed
    (("reward_raw", "reward"), "reward (per response, batch mean)"),
    (("kl", "kl_k3"), "KL to reference (nats/response)"),
    (("entropy",), "entropy (nats/token)"),
    (("response_length",), "response length (tokens)"),
]
# What each logged key is, in the legend (a user read `reward` as the KL-shaped reward; it is the normalised score)
CURVE_LABELS = {"reward_raw": "reward model's score", "reward": "as PPO used it (normalised, clipped, EOS penalty)",
                "kl": "KL (k1)", "kl_k3": "KL (k3)"}


def plot_training(ax_list, rows: list[dict]) -> None:
    x = [r.get("update", i) for i, r in enumerate(rows)]
    for ax, (keys, title) in zip(ax_list, TRAINING_CURVES):
        for j, key in enumerate(keys):
            ys = [r.get(key) for r in rows]
            if any(isinstance(y, (int, float)) for y in ys):
                ax.plot(x, [y if isinstance(y, (int, float)) else float("nan") for y in ys],
                        linestyle="-" if j == 0 else "--", label=CURVE_LABELS.get(key, key))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("PPO update")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)


def plot_hist(ax, sft: list[float], ppo: list[float], what: str = "reward", unit: str = "reward-model score") -> None:
    lo, hi = min(sft + ppo), max(sft + ppo)
    bins = [lo + (hi - lo) * i / 20 for i in range(21)] if hi > lo else 10
    ax.hist(sft, bins=bins, alpha=0.55, label=f"SFT (mean {statistics.fmean(sft):.3f})")
    ax.hist(ppo, bins=bins, alpha=0.55, label=f"PPO (mean {statistics.fmean(ppo):.3f})")
    ax.set_title(f"{what} on held-out prompts", fontsize=10)
    ax.set_xlabel(unit)
    ax.set_ylabel("responses")
    ax.legend(fontsize=8)


def save_plots(rows: list[dict], sft: dict, ppo: dict, out: Path) -> dict[str, Path]:
    """`sft`, `ppo`: the rollouts (rewards and lengths per held-out prompt)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training boxes
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = {"training_curves": out / "training_curves.png", "reward_distribution": out / "reward_distribution.png",
             "overview": out / "overview.png"}
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    plot_training(axes.flat, rows)
    fig.tight_layout()
    fig.savefig(paths["training_curves"], dpi=110)
    fig, ax = plt.subplots(figsize=(6, 4))
    plot_hist(ax, sft["rewards"], ppo["rewards"])
    fig.tight_layout()
    fig.savefig(paths["reward_distribution"], dpi=110)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))  # everything in one picture, for the README
    plot_training([axes[0, 0], axes[0, 1], axes[1, 0], axes[1, 1]], rows)
    plot_hist(axes[0, 2], sft["rewards"], ppo["rewards"])
    plot_hist(axes[1, 2], [float(x) for x in sft["lengths"]], [float(x) for x in ppo["lengths"]], "response length", "tokens")
    fig.tight_layout()
    fig.savefig(paths["overview"], dpi=80)
    plt.close("all")
    return paths


def plot_overoptimisation(points: list[dict], path: Path) -> Path:
    """Gold (left axis) and proxy (right axis: another scale) against sqrt(KL), as Gao et al. 2022 plot them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [p["sqrt_kl"] for p in points]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(x, [p["gold_mean"] for p in points], "o-", color="tab:green", label="gold judge")
    ax.set_xlabel("sqrt(KL to SFT)  (sqrt nats)")
    ax.set_ylabel("gold score (mean)", color="tab:green")
    twin = ax.twinx()
    twin.plot(x, [p["proxy_mean"] for p in points], "s--", color="tab:blue", label="reward model (proxy)")
    twin.set_ylabel("reward-model score (mean)", color="tab:blue")
    for p in points:
        ax.annotate(str(p["update"]), (p["sqrt_kl"], p["gold_mean"]), fontsize=7, textcoords="offset points", xytext=(3, 4))
    ax.set_title("Over-optimisation: gold and proxy against KL (labels: PPO update)", fontsize=10)
    fig.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


SFT_STYLE = {"marker": "*", "markersize": 12, "color": "black", "linestyle": "none"}


def plot_gold_vs_kl(curves: dict[str, list[dict]], path: Path) -> list[str]:
    """Gold score against sqrt(KL to SFT), one series per policy (Gao et al. 2022's axes): SFT a star at KL 0, an RL
    run a line from SFT through its kept policies (policies/update-N/) to its final one, DPO one point. `curves`:
    policy -> points (sqrt_kl, gold_mean, update). Returns the legend's labels as drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, points in curves.items():
        x, y = [p["sqrt_kl"] for p in points], [p["gold_mean"] for p in points]
        style = SFT_STYLE if name == "sft" else {"marker": "o", "linestyle": "-" if len(points) > 1 else "none"}
        ax.plot(x, y, label=name, **style)
        for p in points[1:] if len(points) > 1 else []:  # the update of each kept policy (SFT's point is update 0)
            ax.annotate(str(p["update"]), (p["sqrt_kl"], p["gold_mean"]), fontsize=7, textcoords="offset points",
                        xytext=(3, 4))
    ax.set_xlabel("sqrt(KL to SFT)  (sqrt nats)")
    ax.set_ylabel("gold score (mean)")
    ax.set_title("Every policy: gold score against KL (labels: update)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    labels = ax.get_legend_handles_labels()[1]
    plt.close(fig)
    return labels
