#!/usr/bin/env python3
"""Collect finished training runs into a results table and charts.

The command is `amodal-report` (amodal/report.py:main); this wrapper runs it from a checkout:
python tools/report.py --help
"""

import sys

if __name__ == "__main__":
    from amodal.report import main

    sys.exit(main())
