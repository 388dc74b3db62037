"""``python -m featcache``: the same as the ``featcache`` command."""

from featcache.cli import main

if __name__ == "__main__":
    main()
