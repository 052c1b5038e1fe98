"""Temporary: the two names that amodal/train.py still imports from here, until its rewrite imports
them from where they now live. Delete this file then.

The old shards module was split by job: amodal.data.format (format, manifest, errors), amodal.data.pack
(packing, ensure_synthetic), amodal.data.read (reading, verification) and amodal.data.sources.
"""

from amodal.data.format import ShardError
from amodal.data.pack import ensure_synthetic

__all__ = ["ShardError", "ensure_synthetic"]
