"""The commands: each parses its options, calls the library, and renders what it returns."""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path

import click

from featcache import choices
from featcache.cli.app import cli
from featcache.cli.options import (
    batch_size_option,
    choice_option,
    device_option,
    engine_option,
    model_path_option,
    precision_option,
    scheduler_option,
)
from featcache.cli.progress import EpochBar, ProgressBar
from featcache.cli.render import (
    echo_evaluation,
    echo_extract,
    echo_fit,
    echo_layers,
    echo_prediction,
    printable,
)


@cli.command()
@click.option(
    "--layers",
    "layers_of",
    metavar="NAME",
    default=None,
    help="List the stages of backbone NAME that --layers can pool, with their channels.",
)
def backbones(layers_of: str | None) -> None:
    """List the registered backbones with their weights and preprocessing."""
    from featcache.backbones import get_entry, list_backbones
    from featcache.backbones.weights import installed_backbones

    if layers_of is not None:
        echo_layers(get_entry(layers_of))
        return
    names, installed = list_backbones(), installed_backbones()
    for name in names:
        entry = get_entry(name)
        p = entry.preprocessing
        weights = ", ".join(w.name for w in entry.weights)
        here = "installed" if name in installed else "download on first use"
        click.echo(f"{name}{' (default)' if name == names[0] else ''}: {entry.description}")
        click.echo(f"    weights: {weights} ({here}; first is default), or a file path, or 'random'")
        click.echo(
            f"    input {p.size}x{p.size} {p.resize} {p.interpolation}, mean {p.mean}, std {p.std}, "
            f"pools {', '.join(entry.pools)}; layers last, or multi = {entry.multi} "
            f"({entry.pooled_dim('avg', entry.multi)}-d)"
        )
    click.echo(
        "Any torchvision classification model name (e.g. resnet50), and timm:NAME for any timm model "
        "(e.g. timm:convnext_tiny.fb_in22k_ft_in1k), work too."
    )


@cli.command()
@click.argument("data_dir")
@click.option(
    "-o", "--output", default="features.h5", show_default=True, help="Feature cache to write or update."
)
@click.option(
    "--backbone",
    default=None,
    help=f"Backbone name (see 'featcache backbones'; any torchvision classifier, or timm:NAME, works too). "
    f"Default: the one the existing cache records, else {choices.DEFAULT_BACKBONE}.",
)
@click.option(
    "--weights",
    default=None,
    help="Weights name (e.g. IMAGENET1K_V2), a weights file, or 'random' (tests only). "
    "Default: the cache's, else the backbone's first weights.",
)
@click.option(
    "--labels",
    default=None,
    help="Label map: a .json or .csv file (folder -> name[, category]) or the preset 'garbage26'.",
)
@click.option(
    "--pool",
    type=click.Choice(choices.POOLS),
    default=None,
    help="How the last feature map is pooled into one vector. Default: the cache's, else avg.",
)
@click.option(
    "--layers",
    default=None,
    help="Layers to pool and concatenate: 'last', 'multi' (the backbone's measured preset) or stage "
    "indices and last, e.g. 4,5,6,last (see 'featcache backbones --layers NAME'). "
    "Default: the cache's, else last.",
)
@click.option(
    "--maps",
    type=click.IntRange(min=0),
    default=None,
    metavar="STAGE",
    help="Also keep the unpooled maps of stage STAGE (float16), to fine-tune the network above it with "
    "'fit --model finetune' (e.g. 4: 112x14x14 for efficientnet_lite0). Default: the cache's, else none.",
)
@click.option(
    "--dtype",
    type=click.Choice(choices.DTYPES),
    default=None,
    help="Storage type of the features (float16 halves the file). Default: the cache's, else float32.",
)
@click.option(
    "--precision",
    type=click.Choice(choices.PRECISIONS),
    default=None,
    help="Arithmetic of the backbone: bf16 is faster on CPUs with bfloat16 units and on GPUs; "
    "int8 (OpenVINO, quantised once with NNCF) is faster on any recent CPU. Both change the features "
    "slightly; a model fit on them predicts with the same. Default: the cache's, else fp32.",
)
@batch_size_option("Images per forward pass.")
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Decoding threads working ahead of the model (0: decode in the main thread).",
)
@device_option("Where the backbone runs.")
@engine_option("What runs the backbone.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an existing cache made with another backbone, weights or settings.",
)
@scheduler_option("the extraction")
@click.option(
    "--shard-size",
    type=click.IntRange(min=1),
    default=10000,
    show_default=True,
    help="Images per task with --scheduler.",
)
@click.option(
    "--virtual",
    is_flag=True,
    help="With --scheduler: keep a new cache's shards beside it as its segments (an index of HDF5 "
    "virtual datasets) instead of copying them into one file. An update always appends its shards.",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def extract(
    data_dir: str,
    output: str,
    backbone: str | None,
    weights: str | None,
    labels: str | None,
    pool: str | None,
    layers: str | None,
    maps: int | None,
    dtype: str | None,
    precision: str | None,
    batch_size: int,
    workers: int,
    device: str,
    engine: str,
    overwrite: bool,
    scheduler: str | None,
    shard_size: int,
    virtual: bool,
    quiet: bool,
) -> None:
    """Embed every image under DATA_DIR into an HDF5 feature cache.

    DATA_DIR/<class>/<images> are labelled by folder name; images directly in DATA_DIR are
    unlabelled. Reruns only compute new and changed files; an interrupted run resumes.
    """
    from featcache.extract import extract as run_extract

    bar = ProgressBar("extract", quiet)
    try:
        result = run_extract(
            data_dir,
            output,
            backbone=backbone,
            weights=weights,
            pool=pool,
            layers=layers,
            maps=maps,
            dtype=dtype,
            precision=precision,
            labels=labels,
            batch_size=batch_size,
            workers=workers,
            device=device,
            engine=engine,
            overwrite=overwrite,
            scheduler=scheduler,
            shard_size=shard_size,
            virtual=virtual,
            on_progress=bar.update,
        )
    finally:
        bar.close()
    echo_extract(result)


@cli.command()
@click.argument("data_dir")
@click.option(
    "--candidate",
    "candidates",
    multiple=True,
    metavar="BACKBONE[@LAYERS]",
    help="Also try this backbone with these layers (e.g. efficientnet_lite2@multi, timm:resnet50@last), "
    "or fine-tuned above a stage (efficientnet_lite0@finetune:4); repeatable. Always tried: every "
    "backbone whose weights are installed, with last and multi, and efficientnet_lite0@finetune:5.",
)
@click.option("--only", is_flag=True, help="Try the --candidate backbones alone, not the installed ones too.")
@click.option(
    "--per-class", type=click.IntRange(min=2), default=20, show_default=True, help="Sample size per class."
)
@click.option("--cv", type=click.IntRange(min=2), default=5, show_default=True, help="Stratified folds.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sample and the folds.")
@click.option(
    "--workdir",
    default=None,
    help="Where the sample's features are kept for reruns. Default: a folder per dataset in featcache's "
    "cache folder (~/.cache/featcache/choose).",
)
@batch_size_option("Images per forward pass.")
@device_option("Where the backbones run.")
@engine_option("What runs the backbones.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def choose(
    data_dir: str,
    candidates: tuple[str, ...],
    only: bool,
    per_class: int,
    cv: int,
    seed: int,
    workdir: str | None,
    batch_size: int,
    device: str,
    engine: str,
    as_json: bool,
    quiet: bool,
) -> None:
    """Measure which backbone and layers suit DATA_DIR, on a stratified sample of it.

    Each candidate extracts the same sample once (kept for reruns; a larger --per-class reuses
    it), and logistic regression is cross-validated on its features as 'fit' does (a finetune
    candidate: fine-tuning on its maps, which takes minutes). Prints a table, best first, with
    each candidate's CV fit time and cache size, and the commands for the best.
    """
    from featcache.choose import Candidate, default_candidates
    from featcache.choose import choose as run_choose
    from featcache.settings import RunOptions

    if only and not candidates:
        raise click.UsageError("--only needs at least one --candidate")
    wanted = [] if only else default_candidates()
    wanted += [Candidate.parse(c) for c in candidates]
    bars: list = []  # one candidate's bar at a time: closed when the next candidate starts

    def progress(candidate, p) -> None:
        if not bars or bars[-1].desc != str(candidate):
            if bars:
                bars[-1].close()
            bars.append(ProgressBar(str(candidate), quiet or as_json))
        bars[-1].update(p)

    try:
        result = run_choose(
            data_dir, wanted, per_class=per_class, cv=cv, seed=seed, workdir=workdir,
            run=RunOptions(device=device, engine=engine, batch_size=batch_size), on_progress=progress,
        )  # fmt: skip
    finally:
        if bars:
            bars[-1].close()
    if as_json:
        import json

        click.echo(json.dumps(result.to_dict(data_dir), indent=2))
        return
    click.echo(
        f"{result.n_images} images ({result.n_classes} classes, up to {per_class} each), "
        f"logistic regression (finetune: fine-tuning on the maps), {cv}-fold CV:"
    )
    width = max(len(str(s.candidate)) for s in result.scored)
    heading = f"{'CV accuracy':>15}  {'features':>8}  {'img/s':>6}  {'CV fit s':>8}  {'KiB/image':>9}"
    click.echo(f"  {'candidate':<{width}}  {heading}")
    for s in result.scored:
        acc = f"{100 * s.cv_accuracy_mean:.1f} ± {100 * s.cv_accuracy_std:.1f} %"
        click.echo(
            f"  {str(s.candidate):<{width}}  {acc:>15}  {s.feature_dim:>8}  {s.images_per_second:>6.0f}"
            f"  {s.fit_seconds:>8.1f}  {s.kib_per_image:>9.1f}"
        )
    click.echo("(img/s: decoding and embedding on this machine; a difference within ± is noise)")
    click.echo(f"best: {result.best.candidate}. To extract the whole folder with it, and fit:")
    click.echo(f"  {result.best.extract_command(data_dir)}")
    click.echo(f"  {result.best.fit_command()}")


@cli.command()
@click.argument("features", default="features.h5")
@click.option("--skipped", "show_skipped", is_flag=True, help="List every skipped file with its reason.")
def info(features: str, show_skipped: bool) -> None:
    """Describe a feature cache: images, classes, backbone identity, skipped files, size."""
    from featcache.cache import read_cache, segment_folder

    cache = read_cache(features)
    summary = cache.summary()
    ident = cache.identity
    p = ident.preprocessing
    n, labelled = summary.n_images, summary.n_labelled
    counts = f"{n} images ({labelled} labelled, {n - labelled} unlabelled), {summary.n_classes} classes"
    click.echo(f"{features}: {counts}")
    click.echo(f"  backbone     {ident.backbone}, weights {ident.weights}")
    click.echo(f"  weights sha  {ident.weights_sha256}")
    click.echo(
        f"  features     {ident.feature_dim}-d, {ident.pool} pooling of layers {ident.layers}, "
        f"computed in {ident.precision}"
        f"{f' on {cache.engine}' if cache.engine else ''}, stored as {cache.dtype}"
    )
    if summary.maps is not None:
        stage, shape, per = summary.maps
        dims = "x".join(map(str, shape))
        click.echo(f"  maps         stage {stage}: {dims} float16, {per:.1f} KiB per image")
    crop = f" {p.crop_pct:g}" if p.crop_pct != 1 else ""
    click.echo(
        f"  preprocess   {p.size}x{p.size} {p.resize}{crop} ({p.interpolation}), mean {p.mean}, std {p.std}"
    )
    click.echo(f"  data root    {cache.data_root}")
    made = f"{cache.shards} shard(s) on a Dask cluster" if cache.shards else "one process"
    click.echo(f"  made by      {made}")
    click.echo(f"  created      {cache.created} by featcache {cache.featcache_version}")
    per_image = f", {summary.kib_per_image:.2f} KiB per image" if n else ""
    click.echo(f"  size         {summary.size_bytes / 1024 / 1024:.2f} MiB{per_image}")
    if summary.segments:
        click.echo(
            f"  stored       in {summary.segments} segment(s) in {segment_folder(Path(features)).name}/, "
            f"{100 * summary.unindexed_share:.1f} % of their rows no longer indexed "
            f"(featcache compact {shlex.quote(features)} copies the rows into one file)"
        )
    if cache.folders:
        click.echo("  classes:")
        for folder, count in cache.class_counts().items():
            name, category = cache.label_map.display(folder), cache.label_map.category(folder)
            shown = folder if name == folder else f"{folder} {name}"
            click.echo(f"    {count:6d}  {shown}" + (f" [{category}]" if category else ""))
    click.echo(f"  skipped      {len(cache.skipped)} file(s)")
    listing = cache.skipped if show_skipped else cache.skipped[:10]
    for path, reason in listing:
        click.echo(f"    {printable(path)}: {reason}")
    if len(listing) < len(cache.skipped):
        click.echo(f"    ... and {len(cache.skipped) - len(listing)} more (--skipped lists all)")


@cli.command()
@click.argument("features", default="features.h5")
def compact(features: str) -> None:
    """Copy a cache's rows from its segments back into the one file, and delete the segments.

    An incremental extract writes only the new rows, as a segment in FEATURES.shards/ beside the
    cache; extract compacts by itself when a quarter of the segments' rows are no longer used.
    """
    from featcache.cache import compact as run_compact
    from featcache.files import locked

    with locked(features, "compact"):
        done = run_compact(features)
    mib = 1024 * 1024
    if done.segments:
        click.echo(
            f"{features}: {done.n_images} images now in one file; {done.segments} segment(s) removed, "
            f"{done.bytes_before / mib:.1f} MiB -> {done.bytes_after / mib:.1f} MiB"
        )
    else:
        size = f"{done.bytes_after / mib:.1f} MiB"
        click.echo(f"{features}: {done.n_images} images, already in one file ({size})")


@cli.command()
@click.argument("features", default="features.h5")
@choice_option(
    "--model",
    choices.MODELS,
    "Model family to cross-validate; 'all' compares them and keeps the best (with 'finetune' when "
    "the cache keeps feature maps: minutes, not seconds).",
    default="all",
)
@click.option("--cv", type=click.IntRange(min=2), default=5, show_default=True, help="Stratified folds.")
@click.option(
    "-o",
    "--output",
    default="models",
    show_default=True,
    help="Folder for best.joblib, its manifest, report.json, confusion_matrix.png and oof.npz.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the folds and the models.")
@choice_option(
    "--class-weight",
    choices.CLASS_WEIGHTS,
    "balanced: each class weighs the same in the loss; auto: try none and balanced when the "
    f"largest class has {choices.IMBALANCE}x the images of the smallest, else none.",
)
@choice_option(
    "--select-by",
    choices.SELECT_BY,
    "Out-of-fold score that chooses settings and families (balanced accuracy is accuracy on "
    "balanced classes, and sees a class the model ignores).",
    default=choices.SELECT_BY[0],
)
@click.option(
    "--no-group-duplicates",
    is_flag=True,
    help="Let near-duplicate images (cosine >= 0.98) fall into different folds (by default they "
    "stay in one, so CV does not score memory).",
)
@click.option(
    "--relabel",
    default=None,
    metavar="FILE",
    help="CSV file path,given,suggested (what 'audit --write-relabel' writes): fit with each image in "
    "its suggested class; an empty suggested leaves it out. The image folder is not touched.",
)
@click.option(
    "--exclude",
    default=None,
    metavar="FILE",
    help="Images to leave out: one path per line (as the cache names them), or a CSV file with a "
    "path column.",
)
@scheduler_option("the cross-validation fits (a fold and a setting each; the same result)")
def fit(
    features: str, model: str, cv: int, output: str, seed: int, class_weight: str, select_by: str,
    no_group_duplicates: bool, relabel: str | None, exclude: str | None, scheduler: str | None,
) -> None:  # fmt: skip
    """Cross-validate classifiers on a feature cache and save the best.

    Each family's small grid is scored by stratified k-fold CV; the setting and family with the
    best out-of-fold --select-by score are refit on all labelled images and saved with their
    report, the out-of-fold probabilities (oof.npz) and an out-of-distribution threshold.
    """
    from featcache.cache import read_cache
    from featcache.corrections import read_corrections
    from featcache.fit import Selection
    from featcache.fit import fit as run_fit

    selection = Selection(class_weight, select_by, not no_group_duplicates, scheduler)
    corrections = read_corrections(relabel, exclude)
    data = corrections.apply(read_cache(features)) if corrections else features
    bar = EpochBar()
    try:
        result = run_fit(
            data, model=model, cv=cv, output=output, seed=seed, selection=selection,
            on_progress=bar.message, on_epoch=bar.update,
        )  # fmt: skip
    finally:
        bar.close()
    echo_fit(result)


@cli.command()
@click.argument("source")
@model_path_option("Model bundle to score, or the folder 'fit -o' wrote.")
@batch_size_option("Images per forward pass (image folders only).")
@device_option("Where the backbone runs (image folders only).")
@engine_option("What runs the backbone (image folders only).")
@precision_option(" (image folders only)")
def evaluate(
    source: str, model_path: str, batch_size: int, device: str, engine: str, precision: str | None
) -> None:
    """Score a saved model on a feature cache or a labelled image folder.

    SOURCE is a cache made with the model's backbone, or a folder laid out like the training
    data (its images are classified exactly as 'predict' would, nothing is written). Prints
    accuracy, macro-F1 and a per-class table.
    """
    from featcache.fit import evaluate as run_evaluate

    echo_evaluation(
        source,
        run_evaluate(
            source, model_path, batch_size=batch_size, device=device, engine=engine, precision=precision
        ),
    )


@cli.command()
@click.argument("paths", nargs=-1, required=True)
@model_path_option("Model bundle to use, or the folder 'fit -o' wrote.")
@click.option("--top-k", type=click.IntRange(min=1), default=1, show_default=True, help="Classes per image.")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines: one object per image (or error).")
@click.option(
    "--min-confidence",
    type=click.FloatRange(0, 1),
    default=None,
    help="Also call an image unknown when its top probability is below this (e.g. 0.5).",
)
@batch_size_option("Images per forward pass.")
@device_option("Where the backbone runs; auto picks CUDA when available.")
@engine_option("What runs the backbone.")
@precision_option("")
def predict(
    paths: tuple[str, ...],
    model_path: str,
    top_k: int,
    as_json: bool,
    min_confidence: float | None,
    batch_size: int,
    device: str,
    engine: str,
    precision: str | None,
) -> None:
    """Classify image files and folders (recursively) with a saved model.

    One line per image: path, label, probability (and category when the label map has one), or
    "unknown (closest: ...)" for an image unlike all the training images (or, with
    --min-confidence, one the model is unsure of). An image that cannot be read gets an error
    line; the others are still predicted, and the exit status is then 1.
    """
    from featcache.predictor import Predictor

    predictor = Predictor.load(
        model_path, device=device, batch_size=batch_size, engine=engine, min_confidence=min_confidence,
        precision=precision,
    )  # fmt: skip
    failed = 0
    for p in predictor.predict_files(paths, top_k=top_k):
        failed += p.error is not None
        echo_prediction(p, as_json)
    if failed:
        click.echo(f"{failed} input(s) could not be read", err=True)
        sys.exit(1)


@cli.command()
@click.argument("features", default="features.h5")
@click.option(
    "-o", "--output", default=None, help="PNG file to write. Default: embedding.png beside FEATURES."
)
@click.option(
    "--method",
    type=click.Choice(choices.PLOT_METHODS),
    default="tsne",
    show_default=True,
    help="t-SNE shows clusters (neighbours stay neighbours); PCA is faster and keeps distances linear.",
)
@click.option(
    "--max-points",
    type=click.IntRange(min=3),
    default=3000,
    show_default=True,
    help="Larger caches are drawn from a random sample of this many images.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sample and of t-SNE.")
@click.option(
    "--calibration",
    "model_dir",
    default=None,
    metavar="MODEL_DIR",
    help="Draw instead the reliability diagram of the out-of-fold probabilities 'fit' kept in MODEL_DIR "
    "(default output: MODEL_DIR/calibration.png).",
)
def plot(
    features: str, output: str | None, method: str, max_points: int, seed: int, model_dir: str | None
) -> None:
    """Draw a 2-D map of a feature cache, one colour per class (or, with --calibration, how well a
    model's confidence matches its accuracy).

    Classes that form tight, separate clusters are easy for a linear classifier; overlapping
    ones are where its mistakes will be.
    """
    from featcache.report import plot_calibration, plot_embedding

    if model_dir is not None:
        click.echo(f"{plot_calibration(model_dir, output)}")
        return
    click.echo(f"{plot_embedding(features, output, method=method, max_points=max_points, seed=seed)}")


@cli.command()
@click.option(
    "--workdir",
    default="featcache-demo",
    show_default=True,
    help="Folder for the demo's copy of the images, its cache, model and pictures (created if needed).",
)
@click.option(
    "--backbone",
    default="efficientnet_lite0",
    show_default=True,
    help="Backbone to extract with; efficientnet_lite0's weights are installed with featcache, so it "
    "works offline.",
)
@click.option(
    "--weights", default=None, help="Weights name or file for --backbone (default: its first weights)."
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def demo(workdir: str, backbone: str, weights: str | None, quiet: bool) -> None:
    """Run the whole job on the embedded demo data: extract, fit, evaluate, predict, plot.

    600 Fashion-MNIST images of 10 classes of clothing (MIT licence) ship with featcache: 400 to
    train on, 200 held out. Everything is written under --workdir; rerun the printed commands
    there to try the options. A --workdir that holds files the demo did not make is refused.
    """
    import time

    from featcache import demo as demo_data

    start = time.perf_counter()
    work = Path(workdir)
    bar = ProgressBar("extract", quiet)
    test = str(work / "data" / "test")

    def step(s: demo_data.Step) -> None:
        if s.result is None:
            if s.number == 1:  # the data is in place: say what it is
                _demo_heading(work, backbone)
            click.echo("\n" + click.style(f"[{s.number}/5] {s.what}", bold=True))
            click.echo(f"      $ {s.command}")
            return
        bar.close()
        {1: echo_extract, 2: lambda r: echo_fit(r, per_class=False), 3: lambda r: echo_evaluation(test, r),
         4: _echo_picks, 5: click.echo}[s.number](s.result)  # fmt: skip

    try:
        demo_data.run(work, backbone, weights, on_step=step, on_progress=bar.update,
                      on_message=lambda m: click.echo(m, err=True))  # fmt: skip
    finally:
        bar.close()
    click.echo("\n" + click.style(f"Done in {time.perf_counter() - start:.0f} s.", bold=True)
               + f" Everything is in {work}/:")  # fmt: skip
    for name, what in [
        ("data/", "the demo images (train/, test/) and labels.json"),
        ("features.h5", "the feature cache ('featcache info' describes it)"),
        ("models/best.joblib", "the model, with its manifest, report.json and confusion_matrix.png"),
        ("embedding.png", "the map of the cache"),
    ]:
        click.echo(f"  {name:20} {what}")
    click.echo(
        f"On your own images: featcache extract DATA_DIR --backbone {backbone} && featcache fit "
        "&& featcache predict IMAGE"
    )


def _echo_picks(picks: list) -> None:
    for pick in picks:
        p = pick.prediction
        verdict = "" if p.error else "  right" if p.label == pick.truth else f"  WRONG, it is {pick.truth}"
        echo_prediction(dataclasses.replace(p, path=pick.path), suffix=verdict)


def _demo_heading(work: Path, backbone: str) -> None:
    from featcache import demo as demo_data

    data = demo_data.DemoData(work / "data")
    n_classes = sum(1 for p in data.train.iterdir() if p.is_dir())
    click.echo(
        click.style("featcache demo", bold=True) + f": {data.count('train')} training and "
        f"{data.count('test')} held-out Fashion-MNIST images of {n_classes} classes, copied to {data.root}"
    )
    if backbone == demo_data.BACKBONE:
        click.echo(
            f"Backbone {backbone}: its ImageNet weights are installed with featcache, so the demo runs "
            "offline.\nThe default backbone, mobilenet_v2, downloads its ImageNet weights (14 MB) once, "
            "on a machine with internet."
        )
    click.echo(f"Each step shows the command that does the same from inside {work}/")


@cli.command()
@model_path_option("Model bundle to export, or the folder 'fit -o' wrote.")
@click.option("-o", "--output", default="model.onnx", show_default=True, help="ONNX file to write.")
@click.option(
    "--precision",
    type=click.Choice(("fp32", "int8")),
    default=None,
    help="int8: the network quantised (QuantizeLinear/DequantizeLinear), a third of the size and "
    "faster on CPUs. Default: int8 for a model fit on INT8 features, else fp32.",
)
def export(model_path: str, output: str, precision: str | None) -> None:
    """Write the model and its backbone to one self-contained ONNX file.

    Input: an N x H x W x 3 uint8 RGB batch at the model's input size; output: the class
    probabilities. Class names, categories, preprocessing and the CV report are in the file's
    metadata. The file is checked against 'featcache predict' before it is kept.
    """
    from featcache.export import OPSET
    from featcache.export import export as run_export

    result = run_export(model_path, output, precision=precision)
    meta = result.path.stat().st_size / 1024 / 1024
    outputs = "output 'probabilities'" + ("" if result.ood_difference is None else " and 'ood_score'")
    click.echo(
        f"{result.path}: {meta:.1f} MiB, {result.precision}, ONNX opset {OPSET}; input 'pixels' "
        f"(N x H x W x 3 uint8), {outputs}; classes, preprocessing and the ood threshold in its metadata"
    )
    difference = result.ood_difference
    ood = "" if difference is None else f", largest ood_score difference {difference:.1e}"
    if result.precision == "int8":
        ood = f" (mean of each image's largest {result.mean_difference:.1e}){ood}"
        if result.same_verdict is not None:
            ood += f" (the same unknown verdict for {100 * result.same_verdict:.0f} %)"
    click.echo(
        f"checked against featcache predict on {result.n_checked} images: largest probability difference "
        f"{result.max_difference:.1e}{ood}, same label for {100 * result.same_label:.0f} %"
    )


@cli.command()
@model_path_option("Model bundle to serve, or the folder 'fit -o' wrote.")
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one)."
)
@click.option(
    "--port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="Port to listen on."
)
@click.option(
    "--token",
    envvar="FEATCACHE_TOKEN",
    default=None,
    help="Require 'Authorization: Bearer TOKEN' on every route but /health and the page "
    "(default: $FEATCACHE_TOKEN; none when unset).",
)
@click.option(
    "--max-upload-mb", type=click.FloatRange(min=0, min_open=True), default=20.0, show_default=True,
    help="Largest request body accepted.",
)  # fmt: skip
@click.option(
    "--max-batch", type=click.IntRange(min=1), default=32, show_default=True,
    help="Images that arrive together and share one pass through the network (1: no batching).",
)  # fmt: skip
@device_option("Where the backbone runs.")
@engine_option("What runs the backbone.")
@precision_option("")
def serve(
    model_path: str, host: str, port: int, token: str | None, max_upload_mb: float, max_batch: int,
    device: str, engine: str, precision: str | None,
) -> None:  # fmt: skip
    """Serve the model over HTTP: a web page at /, POST /predict, GET /model, GET /health, docs at /docs.

    Listens on 127.0.0.1 unless --host says otherwise. Ctrl-C stops it.
    """
    import uvicorn

    from featcache.serve import ServeSettings, check_address, create_app

    check_address(host, port)
    settings = ServeSettings(model_path, token=token, max_upload_mb=max_upload_mb, max_batch=max_batch,
                             engine=engine, device=device, precision=precision)  # fmt: skip
    app = create_app(settings)
    shown = "localhost" if host in ("127.0.0.1", "::1") else host
    click.echo(
        f"serving {model_path} on http://{shown}:{port}/ (API: POST /predict, GET /model, GET /health; "
        f"docs: /docs){'; token required' if token else ''}. Ctrl-C stops.",
        err=True,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")
