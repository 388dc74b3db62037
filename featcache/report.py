"""Reports: text tables for people, JSON for scripts, and the confusion-matrix picture."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from featcache.choices import PLOT_METHODS
from featcache.dataset import LabelMap
from featcache.errors import FeatcacheWarning
from featcache.files import replaced_atomically


def save_json(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``report`` as indented JSON and return the path."""
    path = Path(path)
    with replaced_atomically(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


def per_class(
    y: np.ndarray, pred: np.ndarray, folders: list[str], label_map: LabelMap
) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support of each class folder, for true ``y`` and predicted ``pred``."""
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, s = precision_recall_fscore_support(y, pred, labels=folders, zero_division=0)
    return [
        {"folder": c, "name": label_map.display(c), "precision": float(p[i]), "recall": float(r[i]),
         "f1": float(f[i]), "support": int(s[i])}
        for i, c in enumerate(folders)
    ]  # fmt: skip


LOW_RECALL = 0.10
"""A class recognised in fewer than this share of its images gets a warning."""


def low_recall(
    rows: list[dict[str, Any]], confusion: np.ndarray, label_map: LabelMap
) -> list[dict[str, Any]]:
    """The classes of :func:`per_class` ``rows`` recognised in under :data:`LOW_RECALL` of their
    images, each with what it is mistaken for most (from ``confusion``, rows true, columns predicted)."""
    found = []
    for i, r in enumerate(rows):
        if r["support"] == 0 or r["recall"] >= LOW_RECALL:
            continue
        wrong = np.array(confusion[i], copy=True)
        wrong[i] = 0
        j = int(wrong.argmax())
        mistaken_for = label_map.display(rows[j]["folder"])
        found.append({**r, "mistaken_for": mistaken_for, "mistaken": int(wrong[j])})
    return found


def low_recall_line(row: dict[str, Any], where: str) -> str:
    """One line for a :func:`low_recall` entry, e.g. ``class shirt (40 images): recall 2.5 % out of
    fold; mostly mistaken for t-shirt (25)``."""
    mistaken = f"; mostly mistaken for {row['mistaken_for']} ({row['mistaken']})" if row["mistaken"] else ""
    return (
        f"class {_label(row)} ({row['support']} images): recall {100 * row['recall']:.1f} % {where}{mistaken}"
    )


def families_table(report: dict[str, Any]) -> str:
    """One line per model family: CV accuracy mean ± std, balanced accuracy, macro-F1, the smallest
    class recall, fit time, best parameters; then one line per family whose solver did not
    converge in some of its fits, and how the best was chosen."""
    lines = [f"{'family':8} {'CV accuracy':>17} {'balanced':>9} {'macro-F1':>9} {'min recall':>10} "
             f"{'CV s':>7}  best parameters"]  # fmt: skip
    for name, r in report["families"].items():
        mark = " *" if name == report["best"] else "  "
        params = ", ".join(f"{k.split('__')[-1]}={v}" for k, v in r["best_params"].items())
        balanced = r.get("cv_balanced_accuracy_mean", float("nan"))
        lines.append(
            f"{name:8} {100 * r['cv_accuracy_mean']:8.2f} ± {100 * r['cv_accuracy_std']:5.2f} %"
            f" {100 * balanced:8.2f}% {100 * r['cv_f1_macro_mean']:8.2f}%"
            f" {100 * r.get('min_recall', float('nan')):9.1f}% {r['fit_seconds']:7.1f}{mark} {params}"
        )
    if "select_by" in report:
        lines.append(f"* best by out-of-fold {report['select_by'].replace('_', ' ')}")
    for name, r in report["families"].items():
        if r.get("not_converged"):
            lines.append(f"{name}: {r['not_converged']} of {r['fits']} fits did not converge")
    if not report.get("refit_converged", True):
        lines.append(f"{report['best']}: the final fit on all images did not converge")
    if "seconds" in report:
        lines.append(
            f"CV s: cross-validation of every setting; refit of {report['best']} on all images "
            f"{report['refit_seconds']:.1f} s; the whole fit {report['seconds']:.1f} s"
        )
    return "\n".join(lines)


def per_class_table(rows: list[dict[str, Any]]) -> str:
    """Precision, recall, F1 and support per class (columns aligned for wide CJK names too)."""
    width = max([display_width(_label(r)) for r in rows] + [5])
    lines = [f"{_pad('class', width)} {'precision':>9} {'recall':>7} {'F1':>6} {'n':>6}"]
    for r in rows:
        lines.append(
            f"{_pad(_label(r), width)} {100 * r['precision']:8.1f}% {100 * r['recall']:6.1f}% "
            f"{100 * r['f1']:5.1f}% {r['support']:6d}"
        )
    return "\n".join(lines)


def display_width(text: str) -> int:
    """Columns ``text`` takes in a terminal: 2 for each wide (CJK) character, 1 for the others."""
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _pad(text: str, width: int) -> str:
    return text + " " * (width - display_width(text))


def _label(row: dict[str, Any]) -> str:
    return row["folder"] if row["name"] == row["folder"] else f"{row['folder']} {row['name']}"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


CJK_FONTS = (
    "Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK TC", "Noto Sans CJK KR", "Source Han Sans SC",
    "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "Droid Sans Fallback", "SimHei", "Microsoft YaHei",
    "PingFang SC", "Hiragino Sans GB", "AR PL UMing CN", "AR PL UKai CN",
)  # fmt: skip
"""Fonts with CJK characters, the first one installed drawing the class names that need one."""


def _font_rc(names: list[str]) -> dict[str, Any]:
    """The matplotlib settings that draw ``names``: none unless a name holds CJK characters, then
    the default font followed by an installed CJK font (each character is drawn by the first font
    that has it). Without one, a warning says the names will show as boxes."""
    if not any(display_width(n) > len(n) for n in names):
        return {}
    from matplotlib import font_manager, rcParams

    installed = {f.name for f in font_manager.fontManager.ttflist}
    found = next((f for f in CJK_FONTS if f in installed), None)
    if found is None:
        warnings.warn(
            "no font with CJK characters is installed (e.g. Debian's fonts-noto-cjk or fonts-wqy-zenhei): "
            "class names in the picture show as empty boxes",
            FeatcacheWarning,
            stacklevel=3,
        )
        return {}
    return {"font.family": [*rcParams["font.sans-serif"][:1], found]}


def _save(fig, path: str | os.PathLike) -> Path:
    """Lay out ``fig``, write it whole to ``path`` as PNG, and free it."""
    fig.tight_layout()
    path = Path(path)
    with replaced_atomically(path) as tmp:
        fig.savefig(tmp, format="png")
    _pyplot().close(fig)
    return path


def save_confusion_png(
    matrix: np.ndarray, names: list[str], path: str | os.PathLike, title: str = ""
) -> Path:
    """Draw a confusion matrix (rows: true class, columns: predicted), readable up to a few dozen classes."""
    plt = _pyplot()
    with plt.rc_context(_font_rc(names)):
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
        return _save(fig, path)


def save_reliability_png(
    proba: np.ndarray, y_idx: np.ndarray, path: str | os.PathLike, title: str = ""
) -> Path:
    """Draw a reliability diagram: per confidence bin, the accuracy of its predictions against their
    mean confidence (the diagonal is perfect calibration), with how many predictions each bin holds."""
    from featcache.calibration import BINS, expected_calibration_error, reliability

    r = reliability(proba, y_idx, BINS)
    plt = _pyplot()
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(5.5, 6.5), dpi=110, sharex=True,
                                     gridspec_kw={"height_ratios": [3, 1]})  # fmt: skip
    edges = np.linspace(0, 1, BINS + 1)
    used = r.count > 0
    ax.plot([0, 1], [0, 1], ls="--", color="0.5", lw=1, label="perfect calibration")
    ax.bar(edges[:-1][used], r.accuracy[used], width=1 / BINS, align="edge", color="#4c78a8", edgecolor="w",
           label="accuracy of the bin")  # fmt: skip
    centers = (edges[:-1] + 0.5 / BINS)[used]
    ax.plot(centers, r.confidence[used], "_", color="#e45756", ms=14, mew=2.5,
            label="mean confidence of the bin (calibrated: at the top of its bar)")  # fmt: skip
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ece = expected_calibration_error(proba, y_idx, BINS)
    ax.set_title(f"{title}\nECE {ece:.3f} ({BINS} bins, {len(y_idx)} images)".strip(), fontsize=10)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    counts.bar(edges[:-1], r.count, width=1 / BINS, align="edge", color="0.6", edgecolor="white")
    counts.set_xlabel("confidence (top-1 probability)")
    counts.set_ylabel("images")
    return _save(fig, path)


def plot_calibration(
    model_dir: str | os.PathLike = "models", output: str | os.PathLike | None = None
) -> Path:
    """Save the reliability diagram of the out-of-fold probabilities ``fit`` kept in ``model_dir``
    (``oof.npz``), calibrated as the saved model is; ``output`` defaults to ``calibration.png`` there."""
    from featcache.files import writable_file
    from featcache.oof import OOF_FILE, load_oof

    model_dir = Path(model_dir)
    oof = load_oof(model_dir)
    folder = model_dir if model_dir.is_dir() else model_dir.parent
    output = writable_file(folder / "calibration.png" if output is None else output)
    column = {str(f): i for i, f in enumerate(oof["folders"])}
    y_idx = np.array([column[str(t)] for t in oof["truth"]], dtype=int)
    return save_reliability_png(
        oof["probabilities"], y_idx, output, f"out-of-fold probabilities ({OOF_FILE})"
    )


def embed_2d(features: np.ndarray, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """Map N feature vectors to N points in 2-D with t-SNE (on the first 50 principal components)
    or PCA. Needs at least 3 rows."""
    from sklearn.decomposition import PCA

    if method not in PLOT_METHODS:
        raise ValueError(f"method must be one of {', '.join(PLOT_METHODS)}, not {method!r}")
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or len(x) < 3:
        raise ValueError(f"need a 2-D array of at least 3 feature vectors, got shape {x.shape}")
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(x)
    from sklearn.manifold import TSNE

    x = PCA(n_components=min(50, *x.shape), random_state=seed).fit_transform(x)
    perplexity = min(30.0, (len(x) - 1) / 3)
    return TSNE(perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def save_embedding_png(
    points: np.ndarray, labels: np.ndarray, names: list[str], path: str | os.PathLike, title: str = ""
) -> Path:
    """Draw 2-D points coloured by class (``labels`` index ``names``; -1 is unlabelled, in grey),
    each class named at its median (moved aside, with a line to it, where names would overlap),
    with a legend beside the map."""
    plt = _pyplot()
    with plt.rc_context(_font_rc(names)):
        n = len(names)
        colours = plt.get_cmap("tab10").colors
        markers = "os^DvPX*"
        height = max(6.0, 0.24 * n + 1.5)
        fig, ax = plt.subplots(figsize=(height + 3.5, height), dpi=110)
        size = 18 if len(points) <= 2000 else 8
        unlabelled = labels < 0
        if unlabelled.any():
            ax.scatter(*points[unlabelled].T, s=size, c="0.75", marker=".", label="unlabelled")
        medians = []
        for k in range(n):
            mine = points[labels == k]
            if not len(mine):
                continue
            colour, marker = colours[k % 10], markers[(k // 10) % len(markers)]
            ax.scatter(*mine.T, s=size, color=colour, marker=marker, alpha=0.75, linewidths=0,
                       label=f"{names[k]} ({len(mine)})")  # fmt: skip
            medians.append((np.median(mine, axis=0), names[k], [0.6 * c for c in colour]))
        ax.set_xticks([])
        ax.set_yticks([])
        if title:
            ax.set_title(title, fontsize=10)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False, markerscale=1.5,
                  handletextpad=0.3, borderaxespad=0)  # fmt: skip
        fig.tight_layout()
        _name_clusters(ax, medians, fontsize=8 if n <= 12 else 7)
        return _save(fig, path)


def _name_clusters(ax, medians: list, fontsize: int) -> None:
    """Write each ``(point, name, colour)`` at its point, or the nearest place above or below it
    where it overlaps no name already written, joined to the point by a thin line."""
    import matplotlib.patheffects as pe
    from matplotlib.text import Text

    renderer = ax.figure.canvas.get_renderer()
    taken = []
    steps = [0] + [sign * k for k in range(1, 8) for sign in (1, -1)]
    for (x, y), name, colour in medians:
        for i, step in enumerate(steps):
            dy = step * (fontsize + 4)
            label = ax.annotate(
                name, (x, y), xytext=(0, dy), textcoords="offset points", ha="center", va="center",
                fontsize=fontsize, color=colour, weight="bold",
                path_effects=[pe.withStroke(linewidth=2.5, foreground="white")],
                arrowprops={"arrowstyle": "-", "color": colour, "lw": 0.7} if dy else None,
            )  # fmt: skip
            label.update_positions(renderer)
            box = Text.get_window_extent(label, renderer).expanded(1.04, 1.15)  # the words, not the line
            if not any(box.overlaps(other) for other in taken) or i == len(steps) - 1:
                taken.append(box)
                break
            label.remove()


def plot_embedding(
    features: str | os.PathLike = "features.h5",
    output: str | os.PathLike | None = None,
    method: str = "tsne",
    max_points: int = 3000,
    seed: int = 0,
) -> Path:
    """Save a 2-D map of a feature cache coloured by class (display names from its label map).

    ``output`` defaults to ``embedding.png`` beside the cache. Caches of more than ``max_points``
    images are drawn from a seeded random sample of them.
    """
    from featcache.cache import read_cache
    from featcache.errors import FeatcacheError
    from featcache.files import writable_file

    if method not in PLOT_METHODS:
        raise FeatcacheError(f"unknown method {method!r}: choose one of {', '.join(PLOT_METHODS)}")
    if max_points < 3:
        raise FeatcacheError(f"max_points must be at least 3, not {max_points}")
    cache = read_cache(features)
    output = writable_file(Path(features).with_name("embedding.png") if output is None else output)
    if len(cache) < 3:
        raise FeatcacheError(f"{features}: {len(cache)} image(s); a map needs at least 3")
    rows = np.arange(len(cache))
    if len(rows) > max_points:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_points, replace=False))
    points = embed_2d(cache.features[rows], method, seed)
    shown = f"{len(rows)} of {len(cache)}" if len(rows) < len(cache) else f"{len(cache)}"
    title = (
        f"{'t-SNE' if method == 'tsne' else 'PCA'} of {Path(features).name}: {shown} images, "
        f"{len(cache.folders)} classes, {cache.identity.backbone} features"
    )
    return save_embedding_png(points, cache.labels[rows], cache.names, output, title)
