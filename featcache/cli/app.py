"""The ``featcache`` group, and how errors become one line and an exit status."""

from __future__ import annotations

import re
import sys
import traceback
import warnings

import click

from featcache._version import __version__

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _Command(click.Command):
    """A command that also takes ``--debug`` after its name (``main`` reads it from the arguments)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params.append(
            click.Option(
                ["--debug"], is_flag=True, expose_value=False, help="Show full tracebacks for errors."
            )
        )


class _Group(click.Group):
    command_class = _Command


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="featcache")
@click.option("--debug", is_flag=True, expose_value=False, help="Show full tracebacks for errors.")
def cli() -> None:
    """Train an image classifier on a folder of labelled images in seconds.

    A frozen ImageNet CNN embeds every image once into an HDF5 cache (extract); classical
    classifiers are cross-validated on that cache (fit); the best one classifies new images
    (predict). New here? 'featcache demo' runs it all on images that ship with featcache.
    """


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {message}", err=True)


_FLAGS = {
    "overwrite": "--overwrite",
    "output": "-o",
    "weights": "--weights",
    "backbone": "--backbone",
    "model_path": "--model-path",
    "workdir": "--workdir",
    "device": "--device",
    "cv": "--cv",
    "per_class": "--per-class",
    "group_duplicates": "--no-group-duplicates",
    "class_weight": "--class-weight",
    "select_by": "--select-by",
    "min_confidence": "--min-confidence",
}
_PARAMETER = re.compile(r"\b(" + "|".join(_FLAGS) + r")=('[^']*'|[^\s,;:)]+)")


def as_flags(message: str) -> str:
    """A library message with the parameters it names (``overwrite=True``, ``weights=PATH``) written
    as this command line's options (``--overwrite``, ``--weights PATH``; a flag's one setting,
    such as ``group_duplicates=False``, as the flag that sets it)."""

    def flag(m: re.Match) -> str:
        option, value = _FLAGS[m.group(1)], m.group(2).strip("'")
        return option if value in ("True", "False") else f"{option} {value}"

    return _PARAMETER.sub(flag, message)


def _error(message: str, debug: bool, status: int = 1) -> None:
    if debug:
        traceback.print_exc()
    click.echo(f"error: {as_flags(message)}", err=True)
    sys.exit(status)


def _interrupted(e: BaseException | None) -> None:
    from featcache.errors import Interrupted

    click.echo(f"interrupted: {e}" if isinstance(e, Interrupted) else "interrupted", err=True)
    sys.exit(130)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``featcache`` console script: maps errors to exit statuses."""
    from featcache.errors import FeatcacheError, UsageError

    warnings.showwarning = _show_warning
    # featcache refuses such images itself, with the reason, so Pillow's warning is noise
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        cli.main(args=argv, prog_name="featcache", standalone_mode=False)
    except click.exceptions.Abort as e:  # click's form of Ctrl-C
        _interrupted(e.__cause__ or e.__context__)
    except KeyboardInterrupt as e:
        _interrupted(e)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except UsageError as e:  # a mistyped value, as a mistyped option: exit status 2
        _error(str(e), debug, status=2)
    except FeatcacheError as e:
        _error(str(e), debug)
    except OSError as e:  # about a path the user gave: theirs to fix
        _error(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e), debug)
    sys.exit(0)
