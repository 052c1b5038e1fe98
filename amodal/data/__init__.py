"""Data: synthetic generator, HDF5 shards, importers, augmentation, dataset and sampler."""
