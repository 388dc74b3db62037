"""What every benchmark script shares: the CPU line it prints first (its figures mean little
without the CPU they ran on), and its results written into docs/benchmarks.md.

Run the scripts with featcache installed (``make demo`` or ``pip install -e .``), from anywhere:
``.venv/bin/python bench/fit.py``. ``bench/`` is the script's folder, so ``import harness`` works.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def cpu_line() -> str:
    """The CPU model, core count, and whether it has the bfloat16 instructions (AMX, AVX512-BF16)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return f"cpu: {os.cpu_count()} cores (no /proc/cpuinfo: flags unknown)"
    model = next(
        (line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?"
    )
    flags = set(
        next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    )
    bf16 = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("amx_bf16", "avx512_bf16"))
    return f"cpu: {model}, {os.cpu_count()} cores; {bf16}"


class _Tee(io.TextIOBase):
    def __init__(self, stream):
        self.stream, self.kept = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.kept.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def recorded(write: bool = True) -> Iterator[None]:
    """Print the CPU line, run the block, and when it ends without an error (and ``write``), put
    everything it printed into docs/benchmarks.md, under the command that ran it and the date,
    replacing what an earlier run of the same command wrote there."""
    tee = _Tee(sys.stdout)
    command = shlex.join(["python", f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    with contextlib.redirect_stdout(tee):
        print(cpu_line(), flush=True)
        yield
    if write:
        record(command, tee.kept.getvalue())


def record(command: str, output: str, path: Path = BENCHMARKS) -> None:
    """Write ``output`` as the section of ``command`` in ``path`` (replaced, or added at the end)."""
    day = datetime.date.today().isoformat()
    section = (
        f"<!-- bench: {command} -->\n`{command}`, run on {day} (written by the script):\n\n"
        f"```\n{output.rstrip()}\n```\n<!-- /bench -->"
    )
    text = path.read_text() if path.is_file() else ""
    pattern = re.compile(rf"<!-- bench: {re.escape(command)} -->\n.*?<!-- /bench -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)
