"""Figures: one run's accuracy curve, and the experiment grid in the layout of the paper's figure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_run(metrics: Sequence, cfg, path: Path) -> None:
    """Test accuracy against steps, the attack start as a dashed line, every ban as a marker."""
    pts = [(m.step + 1, m.test_accuracy) for m in metrics if m.test_accuracy is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if pts:
        ax.plot(*zip(*pts), marker="o", ms=3, label=f"{cfg.aggregator}")
    if cfg.attack and cfg.byzantine:
        ax.axvline(cfg.attack_start, color="red", ls="--", lw=1, label=f"attack starts ({cfg.attack})")
    ban_steps = sorted({b["step"] for m in metrics for b in m.bans})
    for i, s in enumerate(ban_steps):
        ax.axvline(s, color="green", alpha=0.4, lw=1, label="ban" if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{cfg.task}: {cfg.peers} peers, {cfg.byzantine} Byzantine")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_grid(
    curves: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], attack_start: int, path: Path
) -> None:
    """One panel per attack, one curve per defense: ``curves[attack][defense] = [(step, accuracy), ...]``."""
    attacks = list(curves)
    cols = min(4, len(attacks))
    rows = (len(attacks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False, sharey=True)
    for ax, attack in zip(axes.flat, attacks):
        for defense, pts in curves[attack].items():
            if pts:
                ax.plot(*zip(*pts), label=defense, lw=1.5)
        if attack != "none":
            ax.axvline(attack_start, color="gray", ls="--", lw=1)
        ax.set_title(attack)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(attacks) :]:
        ax.axis("off")
    axes[0][0].set_ylabel("test accuracy")
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
