"""The ``featcache`` command line: thin click commands over the library.

This is the only module that prints or chooses an exit status. Heavy libraries (torch,
scikit-learn) are imported inside the commands so that ``featcache --help`` stays fast.
"""

from __future__ import annotations

import sys
import traceback
import warnings

import click

from featcache import __version__

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="featcache")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Train an image classifier on a folder of labelled images in seconds.

    A frozen ImageNet CNN embeds every image once into an HDF5 cache (extract); classical
    classifiers are cross-validated on that cache (fit); the best one classifies new images
    (predict).
    """
    ctx.obj = {"debug": debug}


@cli.command()
def backbones() -> None:
    """List the registered backbones with their weights and preprocessing."""
    from featcache.backbones import get_entry, list_backbones

    for name in list_backbones():
        entry = get_entry(name)
        p = entry.preprocessing
        weights = ", ".join(w.name for w in entry.weights)
        click.echo(f"{name}{' (default)' if name == list_backbones()[0] else ''}: {entry.description}")
        click.echo(f"    weights: {weights} (first is default), or a file path, or 'random'")
        click.echo(
            f"    input {p.size}x{p.size} {p.resize} {p.interpolation}, mean {p.mean}, std {p.std}, "
            f"pools {', '.join(entry.pools)}"
        )
    click.echo("Any torchvision classification model name (e.g. resnet50) works too.")


def _not_yet(command: str) -> None:
    raise click.ClickException(f"'featcache {command}' is not implemented yet")


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def extract(args: tuple[str, ...]) -> None:
    """Embed every image of a folder into an HDF5 feature cache (not implemented yet)."""
    _not_yet("extract")


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def info(args: tuple[str, ...]) -> None:
    """Describe a feature cache (not implemented yet)."""
    _not_yet("info")


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def fit(args: tuple[str, ...]) -> None:
    """Cross-validate classifiers on a feature cache and save the best (not implemented yet)."""
    _not_yet("fit")


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def evaluate(args: tuple[str, ...]) -> None:
    """Score a saved model on a feature cache or an image folder (not implemented yet)."""
    _not_yet("evaluate")


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def predict(args: tuple[str, ...]) -> None:
    """Classify image files and folders with a saved model (not implemented yet)."""
    _not_yet("predict")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {message}", err=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``featcache`` console script: maps errors to exit statuses."""
    from featcache.errors import FeatcacheError

    warnings.showwarning = _show_warning
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        cli.main(args=argv, prog_name="featcache", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except FeatcacheError as e:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(0)
