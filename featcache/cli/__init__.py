"""The ``featcache`` command line: thin click commands over the library.

This package is the only part of featcache that prints or chooses an exit status. Heavy
libraries (torch, scikit-learn) are imported inside the commands so that ``featcache --help``
stays fast. ``app`` holds the group and the error mapping, ``options`` the shared options,
``progress`` the bars, ``render`` what results look like, and ``commands`` the commands
(``audit`` has a module of its own).
"""

from featcache.cli.app import as_flags, cli, main
from featcache.cli.audit import audit
from featcache.cli.commands import (
    backbones,
    choose,
    demo,
    evaluate,
    export,
    extract,
    fit,
    info,
    plot,
    predict,
    serve,
)

__all__ = ["as_flags", "audit", "backbones", "choose", "cli", "demo", "evaluate", "export", "extract", "fit",
           "info", "main", "plot", "predict", "serve"]  # fmt: skip
