"""Wearable day records: format, datasets, synthetic data, converters, Grain input pipeline.

channels     the channel registry (26 LSM-2 features and the converters' channels)
record       DayRecord and the sanitize gate every written record passes
example      tf.train.Example encoding (wire level) and decoding (protobuf)
shards       shard names, TFRecord framing, ArrayRecord access, CorruptShardError
metadata     metadata.json, load_metadata (validated against the shards), normalize
writer       DatasetWriter: records -> shards + metadata (train-only statistics)
tfds_info    TFDS metadata beside the shards (tfds.builder_from_directory reads them)
synthetic    the synthetic subject-day generator; synthesize is its CLI
converters   real-data converters; convert is their CLI; inspect summarizes a dataset
dataset      read_split for evaluation; pipeline (+ grain_sources) for training
See docs/data.md.
"""
