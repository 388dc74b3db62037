"""The one exception type featcache raises for problems a user can fix."""


class FeatcacheError(Exception):
    """A user-facing failure: the message says what went wrong and what to do."""


class ImageError(FeatcacheError):
    """An input could not be read as an image (corrupt, truncated, not an image, too large).

    ``reason`` says why, ``source`` names the input (a path, or "array"/"image").
    """

    def __init__(self, reason: str, source: object = "image"):
        super().__init__(f"{source}: {reason}")
        self.reason = reason
        self.source = source


class UsageError(FeatcacheError):
    """A value the user gave names nothing that exists (a mistyped backbone): exit status 2 at the
    command line, as for a mistyped option."""


class CacheMismatchError(FeatcacheError):
    """An existing feature cache was made with another backbone, weights or settings than asked for."""


class FeatcacheWarning(UserWarning):
    """Something worth telling the user that does not stop the run (e.g. random weights)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run that keeps its finished work; the message says what was kept."""
