"""Plots for benchmark results (matplotlib, imported only when a plot is asked for)."""

from __future__ import annotations

from pathlib import Path


def plot_decode_curve(curve: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [point["batch_size"] for point in curve]
    rates = [point["decode_tok_s"] for point in curve]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(sizes, rates, marker="o")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("concurrent requests (batch size)")
    axis.set_ylabel("decode tokens/s")
    axis.set_title(title)
    axis.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
