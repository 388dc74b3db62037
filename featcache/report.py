"""Reports: text tables for people, JSON for scripts, and the confusion-matrix picture."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from featcache.files import replaced_atomically


def save_json(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``report`` as indented JSON and return the path."""
    path = Path(path)
    with replaced_atomically(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


def families_table(report: dict[str, Any]) -> str:
    """One line per model family: CV accuracy mean ± std, macro-F1, fit time, best parameters."""
    lines = [f"{'family':8} {'CV accuracy':>16} {'macro-F1':>9} {'fit s':>7}  best parameters"]
    for name, r in report["families"].items():
        mark = " *" if name == report["best"] else "  "
        params = ", ".join(f"{k.split('__')[-1]}={v}" for k, v in r["best_params"].items())
        lines.append(
            f"{name:8} {100 * r['cv_accuracy_mean']:8.2f} ± {100 * r['cv_accuracy_std']:4.2f} %"
            f" {100 * r['cv_f1_macro_mean']:8.2f}% {r['fit_seconds']:7.1f}{mark} {params}"
        )
    return "\n".join(lines)


def per_class_table(rows: list[dict[str, Any]]) -> str:
    """Precision, recall, F1 and support per class."""
    width = max([len(_label(r)) for r in rows] + [5])
    lines = [f"{'class':{width}} {'precision':>9} {'recall':>7} {'F1':>6} {'n':>6}"]
    for r in rows:
        lines.append(
            f"{_label(r):{width}} {100 * r['precision']:8.1f}% {100 * r['recall']:6.1f}% "
            f"{100 * r['f1']:5.1f}% {r['support']:6d}"
        )
    return "\n".join(lines)


def _label(row: dict[str, Any]) -> str:
    return row["class"] if row["name"] == row["class"] else f"{row['class']} {row['name']}"


def save_confusion_png(
    matrix: np.ndarray, names: list[str], path: str | os.PathLike, title: str = ""
) -> Path:
    """Draw a confusion matrix (rows: true class, columns: predicted), readable up to a few dozen classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    side = max(5.0, 0.38 * n + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.2, side), dpi=110)
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros(matrix.shape, float), where=totals > 0)
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    font = 9 if n <= 12 else 7 if n <= 30 else 5
    for i in range(n):
        for j in range(n):
            if matrix[i, j]:
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=font,
                        color="white" if share[i, j] > 0.5 else "black")  # fmt: skip
    ax.set_xticks(range(n), names, rotation=60, ha="right", rotation_mode="anchor", fontsize=font + 1)
    ax.set_yticks(range(n), names, fontsize=font + 1)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    path = Path(path)
    with replaced_atomically(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
