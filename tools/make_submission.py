#!/usr/bin/env python3
"""Write or check the leaderboard file (test.lmdb.tar.gz).

The command is `amodal-submission` (amodal/submission.py:main); this wrapper runs it from a checkout:
python tools/make_submission.py --help
"""

import sys

if __name__ == "__main__":
    from amodal.submission import main

    sys.exit(main())
