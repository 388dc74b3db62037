"""``python cli.py ...`` behaves exactly like ``featcache ...``."""

from featcache.cli import main

if __name__ == "__main__":
    main()
