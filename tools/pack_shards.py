#!/usr/bin/env python3
"""Pack a dataset into HDF5 shards: amodal.data.pack.main (`python tools/pack_shards.py --help`)."""

import sys

from amodal.data.pack import main

if __name__ == "__main__":
    sys.exit(main())
