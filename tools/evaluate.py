#!/usr/bin/env python3
"""Score a checkpoint on a labelled split (leaderboard mIoU, with and without flip TTA).

The command is `amodal-evaluate` (amodal/evaluate.py:main); this wrapper runs it from a checkout:
python tools/evaluate.py --help
"""

import sys

if __name__ == "__main__":
    from amodal.evaluate import main

    sys.exit(main())
