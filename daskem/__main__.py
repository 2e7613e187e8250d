"""``python -m daskem``: the command line (see :mod:`daskem.cli`)."""

from .cli import main

if __name__ == "__main__":
    main()
