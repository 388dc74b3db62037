"""Options that several commands share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from featcache import choices

Decorator = Callable[[Any], Any]


def batch_size_option(help_text: str):
    return click.option(
        "--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help=help_text
    )


def choice_option(flag: str, values: tuple[str, ...], help_text: str, default: str = "auto"):
    """An option that takes one of ``values``, ``default`` when not given."""
    return click.option(flag, type=click.Choice(values), default=default, show_default=True, help=help_text)


def auto_option(flag: str, values: tuple[str, ...], help_text: str):
    return choice_option(flag, values, help_text)


def model_path_option(help_text: str):
    return click.option("--model-path", default=choices.DEFAULT_MODEL, show_default=True, help=help_text)


def device_option(help_text: str):
    return auto_option("--device", choices.DEVICES, help_text)


def engine_option(help_text: str):
    return auto_option(
        "--engine", choices.ENGINES, help_text + " auto: PyTorch on a CUDA GPU, else OpenVINO."
    )


def precision_option(what: str):
    return click.option(
        "--precision",
        type=click.Choice(choices.PRECISIONS),
        default=None,
        help=f"Arithmetic of the backbone{what}. Default: the one the model was fit with; another one "
        "warns, since the features then differ slightly from the ones the model learnt from.",
    )


def scheduler_option(what: str):
    return click.option(
        "--scheduler",
        default=None,
        help=f"Run {what} on a Dask cluster: 'local' or 'local:N' starts N worker processes on this "
        "machine, tcp://HOST:PORT joins a running scheduler. Default: this process alone.",
    )
