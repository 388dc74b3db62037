"""``choose``: which backbone and layers suit a dataset, measured on a stratified sample of it.

Each candidate extracts the same sample (``per_class`` images of every class, a seeded choice
that grows by adding images, so a larger sample reuses a smaller one's), and logistic regression
is cross-validated on its features exactly as ``fit`` does; a ``finetune:STAGE`` candidate keeps
the maps of that stage and cross-validates ``finetune`` on them instead (minutes, not seconds:
its fit time and cache size are reported beside the accuracy). The sample caches are kept (in
:func:`featcache.files.user_cache_dir` unless told otherwise), so a rerun only refits.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache.backbones.entry import LAST, MULTI
from featcache.backbones.identity import BackboneIdentity, digest
from featcache.backbones.registry import get_entry
from featcache.choices import LAYOUT
from featcache.dataset import Dataset, scan
from featcache.errors import CacheMismatchError, FeatcacheError
from featcache.extract import Progress, extract
from featcache.files import user_cache_dir
from featcache.settings import BackboneSpec, RunOptions

SEPARATOR = "@"
"""Between a candidate's backbone and layers: ``efficientnet_lite2@multi``, ``timm:resnet50@last``."""
FINETUNE = "finetune:"
"""Before a stage, in place of layers: ``efficientnet_lite0@finetune:5`` fine-tunes above stage 5."""
DEFAULT_FINETUNE = ("efficientnet_lite0", 5)
"""The fine-tuning candidate tried by default: the cheaper of the two stages the README measures."""


@dataclass(frozen=True)
class Candidate:
    """A backbone and the layers to pool from it (``last``, ``multi`` or stage indices and ``last``),
    or with ``maps`` set, the network above that stage fine-tuned on its cached maps."""

    backbone: str
    layers: str = LAST
    maps: int | None = None

    @classmethod
    def parse(cls, text: str) -> Candidate:
        """``BACKBONE``, ``BACKBONE@LAYERS`` or ``BACKBONE@finetune:STAGE``."""
        backbone, _, layers = text.strip().partition(SEPARATOR)
        if not backbone:
            raise FeatcacheError(
                f"candidate {text!r}: expected BACKBONE, BACKBONE{SEPARATOR}LAYERS or "
                f"BACKBONE{SEPARATOR}{FINETUNE}STAGE"
            )
        layers = layers.strip()
        if layers.lower().startswith(FINETUNE):
            stage = layers[len(FINETUNE) :]
            if not stage.isdigit():
                raise FeatcacheError(
                    f"candidate {text!r}: {FINETUNE}STAGE needs a stage index, got {stage!r}"
                )
            return cls(backbone, LAST, int(stage))
        return cls(backbone, layers or LAST)

    @property
    def family(self) -> str:
        """The model family cross-validated for this candidate."""
        return "logreg" if self.maps is None else "finetune"

    def __str__(self) -> str:
        return f"{self.backbone}{SEPARATOR}{self.layers if self.maps is None else f'{FINETUNE}{self.maps}'}"


@dataclass
class Scored:
    """One candidate's result on the sample."""

    candidate: Candidate
    layers: str
    feature_dim: int
    cv_accuracy_mean: float
    cv_accuracy_std: float
    images_per_second: float
    engine: str
    cache: Path
    n_computed: int = 0
    fit_seconds: float = 0.0
    kib_per_image: float = 0.0

    @property
    def cache_name(self) -> str:
        """The cache file :meth:`extract_command` writes: named after the candidate, so that it never
        meets a cache of other settings in the folder where the commands are pasted."""
        return f"{_safe(str(self.candidate)).replace('@', '-')}.h5"

    def extract_command(self, data_dir: str | os.PathLike) -> str:
        """The ``featcache extract`` command line that makes these features for the whole folder."""
        layers = self.candidate.layers if self.candidate.layers.lower() == MULTI else self.layers
        args = ["featcache", "extract", str(data_dir), "-o", self.cache_name]
        args += ["--backbone", self.candidate.backbone]
        if layers != LAST:
            args += ["--layers", layers]
        if self.candidate.maps is not None:
            args += ["--maps", str(self.candidate.maps)]
        return shlex.join(args)

    def fit_command(self) -> str:
        """The ``featcache fit`` command line for the cache :meth:`extract_command` makes."""
        model = ["--model", "finetune"] if self.candidate.maps is not None else []
        return shlex.join(["featcache", "fit", self.cache_name, *model])


@dataclass
class ChooseResult:
    """What :func:`choose` measured: ``scored`` best first (by CV accuracy, then fewer features,
    then speed); ``n_images`` images of ``n_classes`` classes, ``cv`` folds."""

    scored: list[Scored]
    n_images: int
    n_classes: int
    cv: int
    workdir: Path

    @property
    def best(self) -> Scored:
        return self.scored[0]

    def to_dict(self, data_dir: str | os.PathLike) -> dict:
        """The result as plain JSON data, with the commands that extract ``data_dir`` and fit it
        for each candidate; ``best`` repeats the first candidate."""
        rows = [
            {"backbone": s.candidate.backbone, "layers": s.layers, "asked": s.candidate.layers,
             "feature_dim": s.feature_dim, "cv_accuracy_mean": s.cv_accuracy_mean,
             "cv_accuracy_std": s.cv_accuracy_std, "images_per_second": s.images_per_second,
             "engine": s.engine, "computed": s.n_computed, "model": s.candidate.family,
             "fit_seconds": s.fit_seconds, "kib_per_image": s.kib_per_image,
             "command": s.extract_command(data_dir), "fit_command": s.fit_command()}
            for s in self.scored
        ]  # fmt: skip
        return {"n_images": self.n_images, "n_classes": self.n_classes, "cv": self.cv,
                "workdir": str(self.workdir), "candidates": rows, "best": rows[0]}  # fmt: skip


def default_candidates() -> list[Candidate]:
    """The backbones whose weights are on this machine, each with ``last`` and ``multi`` layers,
    and :data:`DEFAULT_FINETUNE` when its backbone is one of them."""
    from featcache.backbones.weights import installed_backbones

    installed = installed_backbones()
    wanted = [Candidate(name, layers) for name in installed for layers in (LAST, MULTI)]
    backbone, stage = DEFAULT_FINETUNE
    return wanted + ([Candidate(backbone, LAST, stage)] if backbone in installed else [])


def sample(dataset: Dataset, per_class: int, seed: int = 0) -> list[str]:
    """``per_class`` labelled images of each class (all of a smaller class), chosen by a seeded
    shuffle of each class: a larger ``per_class`` keeps the images of a smaller one."""
    chosen = []
    for label, folder in enumerate(dataset.folders):
        files = sorted(f.relpath for f in dataset.files if f.label == label)
        digest = hashlib.sha256(f"{seed}/{folder}".encode()).digest()
        order = np.random.default_rng(int.from_bytes(digest[:8], "little")).permutation(len(files))
        chosen += [files[i] for i in order[:per_class]]
    return sorted(chosen)


def choose(
    data_dir: str | os.PathLike,
    candidates: Sequence[Candidate | str] | None = None,
    per_class: int = 20,
    cv: int = 5,
    seed: int = 0,
    workdir: str | os.PathLike | None = None,
    run: RunOptions | None = None,
    on_progress: Callable[[Candidate, Progress], None] | None = None,
) -> ChooseResult:
    """Cross-validate logistic regression on the features of every candidate for a sample of
    ``data_dir`` (``per_class`` images per class) and rank them.

    ``candidates`` default to :func:`default_candidates`. Each candidate's sample is extracted
    into ``workdir`` (default: a folder per dataset under :func:`~featcache.files.user_cache_dir`),
    reused by later calls. ``images_per_second`` is the candidate's extraction speed here:
    decoding and embedding a batch of the sample after a warm-up batch.
    """
    from sklearn.model_selection import ParameterGrid, StratifiedKFold

    from featcache.cache import read_cache
    from featcache.families import FAMILIES
    from featcache.fit import CVPlan, EpochCounter, cross_validate_family

    if per_class < 2:
        raise FeatcacheError(f"per_class must be at least 2, got {per_class}")
    wanted = [
        c if isinstance(c, Candidate) else Candidate.parse(c) for c in (candidates or default_candidates())
    ]
    if not wanted:
        raise FeatcacheError(
            "no candidates: no backbone's weights are installed here; name some with candidates"
        )
    for candidate in wanted:  # a mistyped candidate fails before any work
        try:
            entry = get_entry(candidate.backbone)
            entry.resolve_layers(candidate.layers)
            if candidate.maps is not None:
                entry.check_maps(candidate.maps)
        except ValueError as e:
            raise FeatcacheError(f"candidate {candidate}: {e}") from None
    dataset = scan(data_dir)
    files = sample(dataset, per_class, seed)
    classes = {f.split("/", 1)[0] for f in files}
    if len(classes) < 2:
        raise FeatcacheError(f"{data_dir}: need labelled images of at least 2 classes: {LAYOUT}")
    work = Path(workdir) if workdir is not None else _default_workdir(dataset.root)
    scored = []
    for candidate in dict.fromkeys(wanted):
        output = work / f"{_safe(str(candidate))}.h5"
        keep = set(files) | _cached_paths(output, dataset)  # a smaller sample keeps a larger one's rows

        def report(progress: Progress, candidate: Candidate = candidate) -> None:
            if on_progress:
                on_progress(candidate, progress)

        spec = BackboneSpec(candidate.backbone, layers=candidate.layers, maps=candidate.maps)
        try:
            result = extract(data_dir, output, spec, run, files=keep, on_progress=report)
        except CacheMismatchError:  # made with other settings (another release's multi, other weights)
            result = extract(data_dir, output, spec, run, files=files, on_progress=report, overwrite=True)
        cache = read_cache(output)
        family = FAMILIES[candidate.family]
        X, y, fixed = family.inputs(cache, files)
        counts = np.unique(y, return_counts=True)[1]
        if counts.min() < cv:
            raise FeatcacheError(
                f"the sample has a class with {counts.min()} readable image(s), fewer than cv={cv}: "
                f"raise per_class={per_class}, or lower cv={cv}"
            )
        folds = list(StratifiedKFold(cv, shuffle=True, random_state=seed).split(X, y))
        epochs = EpochCounter(
            lambda done, total: report(Progress(done, total, stage="fit")),
            len(ParameterGrid(family.grid)) * cv * family.epochs,
        )
        plan = CVPlan(folds, seed, select_by="accuracy")  # a sample with as many images of each class
        scores, _ = cross_validate_family(candidate.family, X, y, plan, fixed, epochs.fit_params(family))
        speed = _images_per_second(cache.identity, dataset.subset(files), run or RunOptions())
        kib = output.stat().st_size / len(cache) / 1024
        scored.append(
            Scored(candidate, result.identity.layers, result.identity.feature_dim, scores["cv_accuracy_mean"],
                   scores["cv_accuracy_std"], speed, result.engine, output, result.n_computed,
                   scores["fit_seconds"], kib)
        )  # fmt: skip
    scored.sort(key=lambda s: (-round(s.cv_accuracy_mean, 9), s.feature_dim, -s.images_per_second))
    return ChooseResult(scored, len(files), len(classes), cv, work)


def _images_per_second(identity: BackboneIdentity, dataset: Dataset, run: RunOptions) -> float:
    from featcache.backbones.build import build_backbone
    from featcache.embedding import embed_files

    net = build_backbone(identity, run)
    batch = max(1, min(run.batch_size, len(dataset.files) // 2))
    done, start = 0, 0.0
    for i, (rows, skipped) in enumerate(
        embed_files(net, dataset, dataset.files[: 3 * batch], batch, workers=2)
    ):
        if i == 0:
            start = time.perf_counter()  # the first batch warms the engine up
        else:
            done += len(rows) + len(skipped)
    seconds = time.perf_counter() - start
    return done / seconds if done and seconds > 0 else float("nan")


def _cached_paths(output: Path, dataset: Dataset) -> set[str]:
    """The images of ``dataset`` that the cache ``output`` already holds (none when it is unreadable)."""
    from featcache.cache import read_cache

    if not output.is_file():
        return set()
    try:
        paths = set(read_cache(output).paths)
    except FeatcacheError:
        return set()
    return paths & {f.relpath for f in dataset.files}


def _default_workdir(root: Path) -> Path:
    resolved = str(root.resolve())
    return user_cache_dir() / "choose" / f"{_safe(root.resolve().name)}-{digest(resolved, length=12)}"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-@" else "_" for c in name)
