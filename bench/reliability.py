"""Reliability under faults: kill -9 trials, hostile files, tampered models, concurrent processes.

- kill trials: ``featcache extract`` in a child process, SIGKILLed at a random moment of its run
  (uniform over the duration of an uninterrupted run measured first), half of them while it
  updates an existing cache; then the output is opened with h5py and the command rerun. A trial
  recovers when the rerun's cache equals the uninterrupted run's. Then a kill just before and
  just after every file rename an update does, and the same for ``featcache fit`` replacing a
  model (the model must load after every kill: the old one, or the new one whole).
- hostile inputs: the corpus of :func:`support.hostile_corpus` through ``extract``
  and ``predict`` (file by file, and the folder); a crash is a traceback, a hang, or an exit
  status other than 0 (extract) or 1 (predict: some inputs unreadable).
- tampered models: the copies of :func:`support.tampered_models` given to
  ``featcache predict``/``evaluate``; each must be refused with one ``error:`` line and run no code.
- concurrency: predictors started together on one bundle with no saved trace; a reader polling
  the cache while extract updates it.

    python bench/reliability.py [--trials 24] [--images 90] [--predictors 6] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import h5py

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the fault injection in tests/support

from harness import recorded
from support import (
    PWNED,
    can_honour_permissions,
    hostile_corpus,
    kinds,
    labelled_folder,
    run_featcache,
    start_featcache,
    tampered_models,
)

from featcache.bundle import load_bundle
from featcache.cache import read_cache

BACKBONE = ["--backbone", "efficientnet_lite0"]


def opens(path: Path) -> bool:
    try:
        with h5py.File(path, "r"):
            return True
    except OSError:
        return False


def extract_args(data: Path, out: Path) -> list:
    return ["extract", data, "-o", out, *BACKBONE, "--batch-size", "8", "-q"]


def fit_args(cache: Path, out: Path) -> list:
    return ["fit", cache, "--model", "logreg", "--cv", "2", "-o", out]


def checked(done: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    if done.returncode != 0:
        raise SystemExit(f"{what} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done


def kill_trials(work: Path, n_trials: int, n_images: int, rng: random.Random) -> None:
    small = labelled_folder(work / "small", per_class=n_images // 6, seed=1)
    data = labelled_folder(work / "data", per_class=n_images // 3, seed=1)
    (data / "a" / "broken.jpg").write_bytes(b"not a picture")
    checked(run_featcache(extract_args(data, work / "reference.h5")), "the uninterrupted extract")
    start = time.monotonic()  # timed again, now that the backbone's trace is saved
    checked(run_featcache(extract_args(data, work / "timed.h5")), "the uninterrupted extract")
    duration = time.monotonic() - start
    reference = read_cache(work / "reference.h5")
    checked(run_featcache(extract_args(small, work / "previous.h5")), "the extract of the smaller folder")
    previous = read_cache(work / "previous.h5")
    print(
        f"uninterrupted extract of {len(reference)} images (+1 bad file): {duration:.1f} s, in a new process"
    )

    rows, killed, recovered, unreadable = [], 0, 0, 0
    for trial in range(n_trials):
        out = work / f"trial{trial:02d}" / "features.h5"
        out.parent.mkdir()
        update = trial % 2 == 1
        if update:
            shutil.copyfile(work / "previous.h5", out)
        at = rng.uniform(0.0, 0.9 * duration)
        proc = start_featcache(extract_args(data, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=at)
            finished_first = True
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            finished_first = False
        killed += not finished_first
        state = "absent"
        if out.exists():
            if not opens(out):
                state = "UNREADABLE"
                unreadable += 1
            else:
                now = read_cache(out)
                state = "complete" if now.same_content(reference) else "OTHER"
                state = "previous" if now.same_content(previous) else state
        parts = out.with_name(f".{out.name}.partial")
        n_parts = len(list(parts.glob("part-*.npz"))) if parts.is_dir() else 0
        checked(run_featcache(extract_args(data, out)), f"the rerun of trial {trial}")
        ok = read_cache(out).same_content(reference)
        recovered += ok
        rows.append((trial, "update" if update else "fresh", at, "finished" if finished_first else "killed",
                     state, n_parts, "equal" if ok else "DIFFERENT"))  # fmt: skip
        shutil.rmtree(out.parent)
    print(f"\n{'trial':>5}  {'run':6}  {'kill at':>7}  {'outcome':8}  {'cache after kill':16}  "
          f"{'batches kept':>12}  rerun vs uninterrupted")  # fmt: skip
    for t, kind, at, outcome, state, n_parts, verdict in rows:
        print(f"{t:5d}  {kind:6}  {at:6.2f}s  {outcome:8}  {state:16}  {n_parts:12d}  {verdict}")
    print(f"kill trials: {n_trials} run, {killed} killed before finishing, {recovered} recovered "
          f"(rerun equals the uninterrupted cache), {unreadable} left a file h5py cannot open")  # fmt: skip
    for run in ("fresh", "update"):
        states = Counter(r[4] for r in rows if r[1] == run and r[3] == "killed")
        print(
            f"  {run} runs killed: {sum(states.values())}; cache right after the kill: "
            + ", ".join(f"{k} {v}" for k, v in sorted(states.items()))
        )

    kills, good = 0, 0
    for when in ("before", "after"):
        for n in range(1, 50):
            out = work / "renames" / "features.h5"
            out.parent.mkdir(exist_ok=True)
            shutil.copyfile(work / "previous.h5", out)
            done = run_featcache(extract_args(data, out), kill_at_replace=n, when=when)
            if done.returncode == 0:
                break
            kills += 1
            now_ok = opens(out) and any(read_cache(out).same_content(c) for c in (previous, reference))
            checked(run_featcache(extract_args(data, out)), "a rerun")
            good += now_ok and read_cache(out).same_content(reference)
            shutil.rmtree(out.parent)
    print(f"extract update killed before/after each of its renames: {kills} kills, {good} left the previous "
          f"or the new cache and recovered on rerun")  # fmt: skip


def fit_kills(work: Path, rng: random.Random) -> None:
    data = labelled_folder(work / "fitdata", per_class=15, seed=2)
    cache = work / "fit.h5"
    checked(run_featcache(extract_args(data, cache)), "extract for fit")
    models = work / "models"
    fit_old = ["fit", cache, "--model", "softmax", "--cv", "3", "-o", models]
    fit_new = ["fit", cache, "--model", "logreg", "--cv", "3", "-o", models]
    checked(run_featcache(fit_old), "the first fit")
    start = time.monotonic()
    checked(run_featcache(fit_new), "a timed fit")
    duration = time.monotonic() - start
    loaded, families, kills = 0, [], 0
    plans = [(n, when) for when in ("before", "after") for n in range(1, 6)] + [
        (None, rng.uniform(0, duration)) for _ in range(10)
    ]
    for n, when in plans:
        checked(run_featcache(fit_old), "fit")
        if n is not None:
            done = run_featcache(fit_new, kill_at_replace=n, when=when)
            kills += done.returncode == -signal.SIGKILL
        else:
            proc = start_featcache(fit_new, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                proc.wait(timeout=when)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
        try:
            families.append(load_bundle(models / "best.joblib")["family"])
            loaded += 1
        except Exception as e:  # noqa: BLE001 - counted and shown
            families.append(f"UNLOADABLE: {e}")
    print(
        f"fit replacing a model: {len(plans)} runs, {kills} killed (before, after each of its 5 renames, "
        f"and at 10 random moments of a {duration:.1f} s run); it loaded afterwards {loaded}/{len(plans)} "
        f"times: the old one {families.count('softmax')}, the new one whole {families.count('logreg')}"
    )


def hostile(work: Path) -> None:
    data = work / "hostile"
    cases = hostile_corpus(data)
    if not can_honour_permissions():
        print("(running as root without the means to drop it: the permission case is left out)")
        cases = [c for c in cases if c.kind != "file without read permission"]
        (data / "odd" / "locked.png").unlink()
    spare = work / "vanishing.png"
    vanish = [data / c.relpath for c in cases if c.vanishes]
    shutil.copyfile(vanish[0], spare)
    done = run_featcache(["extract", data, "-o", work / "hostile.h5", *BACKBONE, "-q"], vanish=vanish,
                         honour_permissions=True, timeout=300)  # fmt: skip
    crashes = int(done.returncode != 0 or "Traceback" in done.stderr)
    cache = read_cache(work / "hostile.h5") if done.returncode == 0 else None
    cached = set(cache.paths) if cache else set()
    skipped = dict(cache.skipped) if cache else {}

    train = labelled_folder(work / "train", classes=("a", "b"), per_class=6, seed=3)
    checked(run_featcache(extract_args(train, work / "train.h5")), "extract")
    checked(run_featcache(fit_args(work / "train.h5", work / "hm")), "fit")
    model = work / "hm" / "best.joblib"
    by_file = run_featcache(["predict", *[data / c.relpath for c in cases], "--model-path", model, "--json"],
                            honour_permissions=True, timeout=300)  # fmt: skip
    shutil.copyfile(spare, vanish[0])
    by_folder = run_featcache(["predict", data / "odd", "--model-path", model, "--json"], vanish=vanish,
                              honour_permissions=True, timeout=300)  # fmt: skip
    results = {}
    for run in (by_file, by_folder):
        crashes += int(run.returncode not in (0, 1) or "Traceback" in run.stderr)
        for line in run.stdout.splitlines():
            r = json.loads(line)
            results.setdefault(r["path"], []).append("label" if "label" in r else "error")

    print(f"\n{'kind':45}  {'expected':8}  {'extract':50}  predict (file, folder)")
    right = 0
    for c in cases:
        shown = str(data / c.relpath).encode("utf-8", "backslashreplace").decode()
        got = f"skipped: {skipped[c.relpath]}" if c.relpath in skipped else "MISSING"
        got = "cached" if c.relpath in cached else got
        want = "label" if c.valid else "error"
        pred = results.get(shown, [])
        ok = (got == "cached") == c.valid and got != "MISSING" and pred == [want, want]
        right += ok
        print(f"{c.kind:45}  {'valid' if c.valid else 'bad':8}  {got[:50]:50}  {', '.join(pred) or 'NONE'}"
              f"{'' if ok else '  <-- WRONG'}")  # fmt: skip
    print(f"hostile inputs: {len(kinds(cases))} kinds in {len(cases)} files, {crashes} crashes, "
          f"{right}/{len(cases)} files handled as expected by extract and both predicts")  # fmt: skip


def tampered(work: Path) -> None:
    data = labelled_folder(work / "tdata", classes=("a", "b"), per_class=6, seed=4)
    checked(run_featcache(extract_args(data, work / "t.h5")), "extract")
    checked(run_featcache(fit_args(work / "t.h5", work / "tm")), "fit")
    other_data = work / "t_other"
    shutil.copytree(data, other_data)
    other_args = ["extract", other_data, "-o", work / "o.h5", "--backbone", "mobilenet_v2", "--weights",
                  "random", "-q"]  # fmt: skip
    checked(run_featcache(other_args), "extract with mobilenet_v2:random")
    checked(run_featcache(fit_args(work / "o.h5", work / "om")), "fit")
    copies = tampered_models(work / "tm" / "best.joblib", work / "om" / "best.joblib", work / "tampered")
    image = data / "a" / "000.jpg"
    refused = 0
    print(f"\n{'tampered model':55}  result")
    for kind, path in copies.items():
        if "another backbone" in kind:
            args = ["evaluate", work / "t.h5", "--model-path", path]
        else:
            args = ["predict", image, "--model-path", path]
        done = run_featcache(args, timeout=120)
        ok = done.returncode == 1 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr
        refused += ok
        last = (done.stderr.strip().splitlines() or ["(nothing)"])[-1].replace(str(work) + "/", "")
        print(f"{kind:55}  {'refused' if ok else 'NOT REFUSED'}: {last[:120]}")
    ran = "YES" if (Path.cwd() / PWNED).exists() else "no"
    print(f"tampered models: {refused}/{len(copies)} refused with one error line; code executed: {ran}")


def concurrency(work: Path, n_predictors: int) -> None:
    data = labelled_folder(work / "cdata", classes=("a", "b"), per_class=10, seed=5)
    checked(run_featcache(extract_args(data, work / "c.h5")), "extract")
    checked(run_featcache(fit_args(work / "c.h5", work / "cm")), "fit")
    traces = work / "fresh-traces"
    env = {**os.environ, "FEATCACHE_CACHE_DIR": str(traces)}
    args = ["predict", data, "--model-path", work / "cm" / "best.joblib", "--json"]
    procs = [start_featcache(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(n_predictors)]  # fmt: skip
    outs = [p.communicate(timeout=600) for p in procs]
    agree = sum(p.returncode == 0 and out == outs[0][0] for p, (out, _) in zip(procs, outs, strict=True))
    saved = sorted(p.name for p in (traces / "traced").iterdir()) if (traces / "traced").is_dir() else []
    print(f"\nconcurrency: {n_predictors} predictors started together with no saved trace: {agree} exited 0 "
          f"with identical output; trace folder holds {len(saved)} file(s), "
          f"{sum(n.startswith('.') for n in saved)} temporary")  # fmt: skip

    out = work / "live.h5"
    small = labelled_folder(work / "live", classes=("a", "b"), per_class=10, seed=6)
    checked(run_featcache(extract_args(small, out)), "extract")
    old = read_cache(out)
    labelled_folder(work / "live", classes=("a", "b", "c"), per_class=30, seed=6)
    checked(run_featcache(extract_args(small, work / "live-ref.h5")), "extract")
    new = read_cache(work / "live-ref.h5")
    proc = start_featcache(extract_args(small, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen = {"old": 0, "new": 0, "torn": 0}
    while True:
        running = proc.poll() is None
        now = read_cache(out)
        seen["old" if now.same_content(old) else "new" if now.same_content(new) else "torn"] += 1
        if not running:
            break
    print(
        f"reader during an extract update ({len(old)} -> {len(new)} images): {sum(seen.values())} reads, "
        f"{seen['old']} saw the old cache, {seen['new']} the new one, {seen['torn']} anything else"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=24, help="random-moment kill trials of extract")
    ap.add_argument("--images", type=int, default=90, help="images in the kill-trial folder (3 classes)")
    ap.add_argument("--predictors", type=int, default=6, help="predict processes started together")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--workdir", help="keep the files here instead of a temporary folder")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="featcache-reliability-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FEATCACHE_CACHE_DIR", str(work / "traces"))
    try:
        kill_trials(work, args.trials, args.images, rng)
        fit_kills(work, rng)
        hostile(work)
        tampered(work)
        concurrency(work, args.predictors)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    with recorded():
        main()
