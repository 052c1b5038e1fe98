"""amodal: amodal hand-part segmentation, from HDF5 shards to a leaderboard file."""

__version__ = "0.1.0"
