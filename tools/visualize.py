#!/usr/bin/env python3
"""Write PNG panels of a checkpoint's predictions beside the ground truth.

The command is `amodal-visualize` (amodal/visualize.py:main); this wrapper runs it from a checkout:
python tools/visualize.py --help
"""

import sys

if __name__ == "__main__":
    from amodal.visualize import main

    sys.exit(main())
