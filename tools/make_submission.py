#!/usr/bin/env python3
"""Write or check the leaderboard file (test.lmdb.tar.gz, docs/design.md §1).

    python tools/make_submission.py PREDICTIONS -o test.lmdb.tar.gz [--test-shards DIR]
    python tools/make_submission.py --check FILE --test-shards DIR [--split test]

Writing reads a predictions file (amodal.predict); with --test-shards the result must also match the
test split's keys before it replaces OUT. Checking names the first fault and exits with status 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import h5py

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from amodal.data.dataset import ShardDataset  # noqa: E402
from amodal.data.shards import ShardError  # noqa: E402
from amodal.submission import SubmissionError, check_submission, write_submission  # noqa: E402


def split_keys(shards: Path, split: str) -> list[str]:
    """The keys of one split of a shard folder, in stored (test-list) order."""
    return ShardDataset(shards, split).keys()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="make_submission.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("predictions", nargs="?", metavar="PREDICTIONS", help="predictions.h5 to convert")
    parser.add_argument("-o", "--output", metavar="OUT", default="test.lmdb.tar.gz", help="file to write (default: %(default)s)")
    parser.add_argument("--check", metavar="FILE", help="validate this leaderboard file instead of writing one")
    parser.add_argument("--test-shards", metavar="DIR", help="shard folder whose split gives the expected keys")
    parser.add_argument("--split", default="test", help="split of --test-shards holding the test keys (default: %(default)s)")
    args = parser.parse_args(argv)

    if args.check and args.predictions:
        parser.error("give PREDICTIONS (to write) or --check FILE (to validate), not both")
    if not args.check and not args.predictions:
        parser.error("give PREDICTIONS to write a leaderboard file, or --check FILE --test-shards DIR")
    if args.check and not args.test_shards:
        parser.error("--check needs --test-shards DIR (the expected test keys)")

    try:
        keys = None
        if args.test_shards:
            shards = Path(args.test_shards)
            if not shards.is_dir():
                raise SubmissionError(f"--test-shards {shards}: no such folder")
            keys = split_keys(shards, args.split)
        if args.check:
            check_submission(args.check, keys)
            print(f"OK {args.check}: {len(keys)} test images, {2 * len(keys)} label maps, in test-list order")
            return 0
        out = write_submission(args.predictions, args.output, test_keys=keys)
        with h5py.File(args.predictions, "r") as f:
            n = len(f["keys"])
        print(f"wrote {out}: {n} test images" + (f", checked against {args.test_shards}" if keys is not None else ""))
        return 0
    except (SubmissionError, ShardError) as e:  # the file, key or shard folder at fault, no traceback
        print(f"FAULT: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
