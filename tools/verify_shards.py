#!/usr/bin/env python3
"""Re-hash and check a shard folder: amodal.data.read.main (`python tools/verify_shards.py DIR`)."""

import sys

from amodal.data.read import main

if __name__ == "__main__":
    sys.exit(main())
