"""Data: byte tokenizer, document sources, synthetic long-context tasks, grain pipeline.

Modules (import what you need; nothing heavy is imported here):
  tokenizer    ByteTokenizer (256 bytes + PAD/BOS/EOS/<AC>).
  sources      random-access document sources: stdlib corpus, text globs, prepared tfds datasets.
  tfds_writer  write a text tfds dataset (ArrayRecord) offline, without TensorFlow.
  synthetic    passkey, multi-needle S-NIAH and MQAR tasks with a held-out seed split.
  pipeline     grain train iterator (checkpointable), eval batches, unigram baseline.
"""
