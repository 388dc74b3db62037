"""How featcache's costs grow with the data (issue 29): appending to a cache, reading it, fitting on it.

    python bench/scale.py --full CACHE [--workdir DIR] [--sizes 10000,60000]
                          [--parts append,info,finetune,fit] [--before CHECKOUT] [--before-fit 10000]
                          [--maps-images 300]

``CACHE`` is a cache of all 60,000 Fashion-MNIST training images as 28×28 PNGs (efficientnet_lite0),
made by ``featcache extract FOLDER -o CACHE --backbone efficientnet_lite0`` over the folder that
``bench/fashion.py`` writes (``fashion.write_folder(FOLDER, "train", None)``). For each size N, a
folder of N of those images (hard links: the same files, sizes and modification times; 1,000 per
class for 10,000, all for 60,000) and the cache of exactly those rows are made from it. Every
figure is a command in a process of its own: wall seconds, featcache's own "in X s" where it
prints one, and peak memory (the process's maximum resident set).

- append: 100 new images (Fashion-MNIST t10k PNGs) added to the folder, ``featcache extract``
  rerun on the cache (a copy of the one-file cache each time), against extracting those 100 alone
  into an empty cache; warm (files in the page cache) and cold (after dropping it, where this
  machine allows). Then a second append of 100 more to the cache the first left in segments, and
  a rerun with nothing changed (the rescan: stat calls).
- info: ``featcache info`` on the cache, in one file and in segments.
- finetune (``--maps-images M``, at the first size only): the maps of stage 4 of M of its images
  (``extract --maps 4``); ``featcache fit --model finetune --cv 3`` against one fine-tune fit of
  the same maps (``FinetuneClassifier``, the whole schedule on all of them), in a process each.
- fit: ``featcache fit --model all --cv 5`` against one plain ``LogisticRegression(C=0.01)`` fit on
  the same rows (scikit-learn's defaults: lbfgs, max_iter 100, all cores), with each family's CV accuracy.

With ``--before CHECKOUT`` (a checkout of the previous release, e.g. ``git worktree add /tmp/old
d1dd5ae``), the same commands also run with that featcache (its caches are this cache with the
format number it reads) in the same run, as the baseline; its ``fit`` only at the sizes of
``--before-fit`` (at 60,000 it takes over 20 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fashion
import h5py
import numpy as np
from harness import recorded
from PIL import Image

from featcache.cache import read_cache, write_cache

FEATCACHE = [sys.executable, "-m", "featcache"]


def measured(args: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``args`` (in a folder without featcache's sources, so that ``--before`` runs the checkout
    it names); its wall seconds, peak memory (MiB), output, and the "in X s" it printed."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tempfile.gettempdir()
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{' '.join(map(str, args))} failed:\n{out}")
    inside = re.search(r" in ([0-9.]+) s", out)
    seconds = float(inside[1]) if inside else None
    return {"wall": wall, "mib": usage.ru_maxrss / 1024, "out": out, "inside": seconds}


def featcache_env(checkout: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if checkout is not None:
        env["PYTHONPATH"] = str(checkout)
    return env


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def subset(full: Path, n: int, workdir: Path) -> tuple[Path, Path]:
    """A folder of ``n`` of the full cache's images (hard links) and the cache of exactly those rows."""
    cache = read_cache(full)
    folder, path = workdir / f"data-{n}", workdir / f"cache-{n}.h5"
    rng = np.random.default_rng(0)
    if n >= len(cache):
        rows = np.arange(len(cache))
    else:
        per = n // len(cache.folders)
        rows = np.sort(np.concatenate([rng.choice(np.flatnonzero(cache.labels == c), per, replace=False)
                                       for c in range(len(cache.folders))]))  # fmt: skip
    if not path.is_file():
        for i in rows:
            target = folder / cache.paths[i]
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(Path(cache.data_root) / cache.paths[i], target)
        part = read_cache(full)
        part.features = np.asarray(part.features[rows])
        part.labels, part.paths = part.labels[rows], [cache.paths[i] for i in rows]
        part.sizes, part.mtimes_ns = part.sizes[rows], part.mtimes_ns[rows]
        part.data_root, part.skipped = str(folder.resolve()), []
        write_cache(part, path)
    return folder, path


def as_format_1(path: Path, target: Path) -> Path:
    """A copy of the one-file cache ``path`` that the previous release reads (format 1)."""
    shutil.copyfile(path, target)
    with h5py.File(target, "r+") as f:
        f.attrs["format_version"] = 1
    return target


def new_images(folder: Path, start: int, count: int = 100) -> list[Path]:
    """``count`` Fashion-MNIST t10k images from ``start`` as PNGs in ``folder``'s class folders."""
    x, y = fashion.load("t10k")
    written = []
    for i in range(start, start + count):
        path = folder / fashion.CLASSES[y[i]] / f"t10k-{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(path)
        written.append(path)
    return written


def remove_cache(path: Path) -> None:
    path.unlink(missing_ok=True)
    shutil.rmtree(path.with_name(path.name + ".shards"), ignore_errors=True)


def append_part(n: int, folder: Path, base: Path, workdir: Path, before: Path | None) -> None:
    extract = ["extract", "--backbone", "efficientnet_lite0"]
    alone = workdir / "alone"
    shutil.rmtree(alone, ignore_errors=True)
    new_images(alone, 0)
    rows = []
    for who, checkout in (("this", None), ("before", before)):
        if who == "before" and checkout is None:
            continue
        env = featcache_env(checkout)
        for temperature in ("warm", "cold"):
            trial = workdir / "trial.h5"
            remove_cache(trial)
            if who == "this":
                shutil.copyfile(base, trial)
            else:
                as_format_1(base, trial)
            added = new_images(folder, 0)
            empty = workdir / "alone.h5"
            remove_cache(empty)
            cold = temperature == "cold" and drop_page_cache()
            if temperature == "cold" and not cold:
                print(f"  ({who}: cannot drop the page cache here: cold runs left out)")
                for p in added:
                    p.unlink()
                break
            one = measured([*FEATCACHE, *extract, str(folder), "-o", str(trial), "-q"], env)
            if cold:
                drop_page_cache()
            ref = measured([*FEATCACHE, *extract, str(alone), "-o", str(empty), "-q"], env)
            rows.append((who, temperature, "append 100", one, ref))
            if who == "this" and temperature == "warm":
                info = measured([*FEATCACHE, "info", str(trial)])
                more = new_images(folder, 100)
                two = measured([*FEATCACHE, *extract, str(folder), "-o", str(trial), "-q"], env)
                rows.append((who, temperature, "append 100 more (in segments)", two, ref))
                same = measured([*FEATCACHE, *extract, str(folder), "-o", str(trial), "-q"], env)
                rows.append((who, temperature, "rerun, nothing changed", same, ref))
                for p in more:
                    p.unlink()
                print(f"  info on the cache in segments: {info['wall']:.2f} s, {info['mib']:.0f} MiB")
            elif who == "before" and temperature == "warm":
                same = measured([*FEATCACHE, *extract, str(folder), "-o", str(trial), "-q"], env)
                rows.append((who, temperature, "rerun, nothing changed", same, ref))
            for p in added:
                p.unlink()
            remove_cache(trial)
    print(f"  {'featcache':<9} {'cache':<5} {'what':<30} {'wall s':>7} {'in s':>6} {'peak MiB':>8} "
          f"{'alone: in s':>11} {'peak MiB':>8} {'ratio':>6}")  # fmt: skip
    for who, temperature, what, one, ref in rows:
        inside = one["inside"] if one["inside"] is not None else float("nan")
        print(f"  {who:<9} {temperature:<5} {what:<30} {one['wall']:7.2f} {inside:6.2f} {one['mib']:8.0f} "
              f"{ref['inside']:11.2f} {ref['mib']:8.0f} {inside / ref['inside']:6.2f}x")  # fmt: skip


def info_part(base: Path, workdir: Path, before: Path | None) -> None:
    runs = [("this", "one file", measured([*FEATCACHE, "info", str(base)]))]
    if before is not None:
        old = as_format_1(base, workdir / "before.h5")
        runs.append(("before", "one file", measured([*FEATCACHE, "info", str(old)], featcache_env(before))))
        old.unlink()
    for who, layout, run in runs:
        print(f"  info ({who}, {layout}): {run['wall']:.2f} s, {run['mib']:.0f} MiB")


PLAIN = """
import sys, time
import numpy as np
from sklearn.linear_model import LogisticRegression
from featcache.cache import read_cache
X, y = read_cache(sys.argv[1]).labelled()
start = time.perf_counter()
LogisticRegression(C=0.01).fit(X, y)
print(f"plain logistic regression in {time.perf_counter() - start:.2f} s")
"""


def fit_part(n: int, base: Path, workdir: Path, before: Path | None, before_sizes: set[int]) -> None:
    plain = measured([sys.executable, "-c", PLAIN, str(base)])
    print(f"  one plain LogisticRegression(C=0.01): {plain['inside']:.1f} s")
    runs = [("this", None, base)]
    if before is not None and n in before_sizes:
        runs.append(("before", before, as_format_1(base, workdir / "before.h5")))
    for who, checkout, cache in runs:
        out = workdir / f"models-{who}-{n}"
        run = measured([*FEATCACHE, "fit", str(cache), "--model", "all", "--cv", "5", "-o", str(out)],
                       featcache_env(checkout))  # fmt: skip
        report = json.loads((out / "report.json").read_text())
        families = ", ".join(
            f"{name} {100 * f['cv_accuracy_mean']:.2f} % ({f['best_params']}, {f['fit_seconds']:.0f} s)"
            for name, f in report["families"].items()
        )
        ratio = run["wall"] / plain["inside"]
        print(f"  fit --model all ({who}): {run['wall']:.1f} s = {ratio:.1f}x the plain fit, peak "
              f"{run['mib']:.0f} MiB; best {report['best']}; {families}")  # fmt: skip


ONE_FINETUNE = """
import sys, time
from featcache.cache import read_cache
from featcache.finetune import FinetuneClassifier
cache = read_cache(sys.argv[1])
X, y = cache.labelled(maps=True)
start = time.perf_counter()
FinetuneClassifier(cache.identity.to_dict()).fit(X, y)
print(f"one fine-tune fit in {time.perf_counter() - start:.2f} s")
"""


def finetune_part(folder: Path, workdir: Path, images: int, before: Path | None) -> None:
    maps_folder, maps = workdir / f"maps-data-{images}", workdir / f"maps-{images}.h5"
    if not maps.is_file():
        per = images // len(fashion.CLASSES)
        for name in fashion.CLASSES:
            (maps_folder / name).mkdir(parents=True, exist_ok=True)
            for src in sorted((folder / name).iterdir())[:per]:
                if not (maps_folder / name / src.name).exists():
                    os.link(src, maps_folder / name / src.name)
        measured([*FEATCACHE, "extract", str(maps_folder), "-o", str(maps), "--backbone",
                  "efficientnet_lite0", "--maps", "4", "-q"])  # fmt: skip
    one = measured([sys.executable, "-c", ONE_FINETUNE, str(maps)])
    print(f"  {images} maps of stage 4: one fine-tune fit (20 epochs) {one['inside']:.1f} s, "
          f"{20 * images / one['inside']:.0f} image-epochs/s")  # fmt: skip
    runs = [("this", None, maps)]
    if before is not None:
        runs.append(("before", before, as_format_1(maps, workdir / "before-maps.h5")))
    for who, checkout, cache in runs:
        out = workdir / f"finetune-{who}"
        run = measured([*FEATCACHE, "fit", str(cache), "--model", "finetune", "--cv", "3", "-o", str(out)],
                       featcache_env(checkout))  # fmt: skip
        report = json.loads((out / "report.json").read_text())["families"]["finetune"]
        ratio = run["wall"] / one["inside"]
        accuracy = 100 * report["cv_accuracy_mean"]
        print(f"  fit --model finetune --cv 3 ({who}): {run['wall']:.1f} s = {ratio:.2f}x one fit; "
              f"{report['fits']} CV fits, CV accuracy {accuracy:.2f} % ({report['best_params']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "featcache-scale")
    parser.add_argument("--sizes", default="10000,60000")
    parser.add_argument("--parts", default="append,info,finetune,fit")
    parser.add_argument("--before", type=Path, default=None)
    parser.add_argument("--before-fit", default="10000")
    parser.add_argument("--maps-images", type=int, default=300)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    args.workdir.mkdir(parents=True, exist_ok=True)
    with recorded():
        print(f"data: Fashion-MNIST training images (28x28 PNG), efficientnet_lite0; {args.full}")
        sizes = [int(n) for n in args.sizes.split(",")]
        for n in sizes:
            folder, base = subset(args.full, n, args.workdir)
            print(f"{n} images ({base.stat().st_size / 2**20:.0f} MiB cache):")
            if "append" in parts:
                append_part(n, folder, base, args.workdir, args.before)
            if "info" in parts:
                info_part(base, args.workdir, args.before)
            if "finetune" in parts and n == sizes[0]:
                finetune_part(folder, args.workdir, args.maps_images, args.before)
            if "fit" in parts:
                fit_part(n, base, args.workdir, args.before, set(map(int, args.before_fit.split(","))))


if __name__ == "__main__":
    main()
