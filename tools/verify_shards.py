#!/usr/bin/env python3
"""Re-hash and check a shard folder: python tools/verify_shards.py DIR

Checks the manifest (fields, counts, fingerprint), each listed shard (present, size, sha256, datasets
and shapes against the manifest) and that no unlisted shard lies beside them. Prints each problem with
the file it concerns; exits 1 when there is any, 0 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amodal.data.shards import read_manifest, verify_shards  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="shard folder (manifest.json + <split>-NNNNN.h5)")
    args = ap.parse_args(argv)
    problems = verify_shards(args.root)
    if problems:
        for p in problems:
            print(f"verify_shards: {p}", file=sys.stderr)
        print(f"{args.root}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    m = read_manifest(args.root)
    counts = ", ".join(f"{k} {v['count']}" for k, v in m["splits"].items())
    n = sum(len(v["shards"]) for v in m["splits"].values())
    print(f"{args.root}: OK ({n} shards; {counts}; fingerprint {m['fingerprint']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
