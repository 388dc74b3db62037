"""Progress bars (tqdm) driven by the library's progress callbacks."""

from __future__ import annotations

import sys

import click

_UNITS = {"download": "B", "extract": "img", "fit": "epoch"}


class ProgressBar:
    """tqdm bars driven by the library's progress callbacks: one per stage (download, extract, fit),
    closed as soon as its stage completes."""

    def __init__(self, desc: str, quiet: bool):
        self.desc, self.quiet, self.bar, self.stage = desc, quiet, None, None
        self.finished: str | None = None

    def update(self, progress) -> None:
        if self.quiet or progress.stage == self.finished:
            return
        if self.bar is None or progress.stage != self.stage:
            from tqdm import tqdm

            self.close()
            self.stage = progress.stage
            download = progress.stage == "download"
            self.bar = tqdm(
                total=progress.total, initial=progress.done, desc="weights" if download else self.desc,
                unit=_UNITS[progress.stage], unit_scale=download, dynamic_ncols=True,
            )  # fmt: skip
        self.bar.update(progress.done - self.bar.n)
        if progress.stage == "extract":
            self.bar.set_postfix(skipped=progress.skipped, refresh=False)
        if progress.total is not None and progress.done >= progress.total:
            self.close()  # the stage is over: its bar shows its own time, not what comes after it
            self.finished = progress.stage

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class EpochBar:
    """A tqdm bar over the epochs of the families that train in epochs (every setting, fold and the
    refit); messages go above it, never into it."""

    def __init__(self):
        self.bar = None

    def update(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="epochs", unit="epoch", dynamic_ncols=True)
        self.bar.update(done - self.bar.n)

    def message(self, text: str) -> None:
        if self.bar is None:
            click.echo(text, err=True)
        else:
            self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
