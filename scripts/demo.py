"""The end-to-end demo; kept for old instructions. Same as ``daskem demo``.

python scripts/demo.py --size 512 --out demo-out   # = daskem demo --size 512 --out demo-out
"""

from __future__ import annotations

import sys

from daskem.cli import main

if __name__ == "__main__":
    main(["demo", *sys.argv[1:]])
