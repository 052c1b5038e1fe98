"""Data: everything between a dataset on disk and a batch of tensors.

- format: the shard format (FORMAT.md): constants, errors, RawSample, layout, manifest, fingerprint.
- sources: what is packed: SyntheticSource, CourseSource (the course's LMDB layout), FolderSource,
  and writers of those layouts for fixtures.
- pack: RawSamples into shards (crops, shard files, journal, process pool); ensure_synthetic; the
  `amodal-pack` command line.
- codec: the byte codecs of format version 2 (JPEG / PNG / raw crops, zlib / raw maps).
- read: ShardFile, ChunkReader, BlobReader, verify_shards; the `amodal-verify` command line.
- stage: node-local copies of the shards a job reads (stage_data).
- synthetic: the procedural hand generator. augment: crops and augmentation.
- dataset: ShardDataset; sampler: sample-exact batching and loaders.

Imports run one way: format <- sources <- pack; format, codec <- read <- dataset; codec <- pack;
format <- stage.
"""
