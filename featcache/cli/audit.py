"""``featcache audit``: what the cache says about its own images."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import click

from featcache.cli.app import cli
from featcache.cli.render import echo_audit


@cli.command()
@click.argument("features", default="features.h5")
@click.option(
    "--against",
    default=None,
    metavar="OTHER.h5",
    help="Also list the images of this cache (e.g. the test set's) that near-duplicate one of FEATURES.",
)
@click.option(
    "--model-path",
    default=None,
    help="Model fit on FEATURES whose out-of-fold probabilities (oof.npz beside it) rank label "
    "issues. Default: models/best.joblib when it was fit on this cache; else a logistic "
    "regression is cross-validated here.",
)
@click.option(
    "-o",
    "--output",
    default=None,
    metavar="FOLDER",
    help="Write FOLDER/audit.jsonl and FOLDER/index.html (a page with thumbnails).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="JSON Lines on stdout: one object per finding, with its kind."
)
@click.option(
    "--write-relabel",
    default=None,
    metavar="FILE",
    help="Write the label issues as CSV path,given,suggested, for 'fit --relabel FILE'.",
)
@click.option(
    "--similarity",
    type=click.FloatRange(0, 1, min_open=True),
    default=None,
    help="Cosine similarity from which two images are near-duplicates. Default: 0.98.",
)
@click.option(
    "--outliers", type=click.IntRange(min=0), default=5, show_default=True, help="Outliers listed per class."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the folds.")
@click.option("--quiet", "-q", is_flag=True, help="No progress messages.")
def audit(
    features: str, against: str | None, model_path: str | None, output: str | None, as_json: bool,
    write_relabel: str | None, similarity: float | None, outliers: int, seed: int, quiet: bool,
) -> None:  # fmt: skip
    """Find probable label errors, near-duplicates, leaks into another cache, and outliers.

    Reads the cache (and fit's out-of-fold probabilities when they are for it); never moves,
    changes or deletes an image. Label conflicts (near-duplicates filed under different
    classes) come first.
    """
    from featcache.audit import SIMILARITY, finding_dict
    from featcache.audit import audit as run_audit
    from featcache.audit import write_relabel as save_relabel
    from featcache.files import writable_folder

    for folder in (output, None if write_relabel is None else Path(write_relabel).parent):
        if folder is not None:
            writable_folder(folder)  # before the work, not after it

    def progress(message: str) -> None:
        if not quiet:
            click.echo(f"audit: {message}", err=True)

    result = run_audit(
        features, against=against, model_path=model_path,
        similarity=SIMILARITY if similarity is None else similarity, outliers=outliers, seed=seed,
        on_progress=progress,
    )  # fmt: skip
    files = path = None  # the files first: a closed pipe (| head) must not lose them
    if output is not None:
        from featcache.audit_page import write_audit

        files = write_audit(result, output)
    if write_relabel is not None:
        path = save_relabel(result, write_relabel)
    if as_json:
        for finding in result.findings():
            click.echo(json.dumps(finding_dict(finding)))
        for note in result.notes:
            click.echo(f"note: {note}", err=True)
    else:
        echo_audit(result)
    if files is not None:
        click.echo(f"wrote {files.jsonl} and {files.html} (open it in a browser)", err=as_json)
    if path is not None:
        click.echo(
            f"wrote {path} ({len(result.label_issues)} images): keep the rows you agree with, edit "
            "'suggested' (empty leaves an image out), then:",
            err=as_json,
        )
        click.echo(f"  featcache fit {shlex.quote(features)} --relabel {shlex.quote(str(path))}", err=as_json)
