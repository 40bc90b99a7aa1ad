"""Write text as a tfds dataset (ArrayRecord) offline, without TensorFlow.

TFDS's own writers (`store_as_tfds_dataset`, dataset builders) go through download_and_prepare,
which needs extra packages and a download manager. This writes the same on-disk layout directly:
`{data_dir}/{name}/{version}/{name}-{split}.array_record-00000-of-00001` files of serialized
`tf.train.Example` protos (TFDS's bundled proto copy, no TF), plus dataset_info.json/features.json
written by `tfds.folder_dataset.write_metadata`. Read back with `tfds.data_source(name,
split=..., data_dir=data_dir)`, i.e. `--data.source=tfds:NAME --data.tfds_data_dir=DATA_DIR`.

  python -m data.tfds_writer --name=my_text --data_dir=/data/tfds \
      --split=train:'corpus/train/*.txt' --split=eval:'corpus/eval/*.txt'
"""

import argparse
import glob
import os

from array_record.python import array_record_module
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer
from tensorflow_datasets.core import splits as splits_lib


def write_text_dataset(name: str, data_dir: str, splits: dict[str, list[str]],
                       version: str = "1.0.0", feature: str = "text") -> str:
  """Writes each split's texts as examples `{feature: text}`; returns the dataset version dir."""
  out_dir = os.path.join(data_dir, name, version)
  os.makedirs(out_dir, exist_ok=True)
  features = tfds.features.FeaturesDict({feature: tfds.features.Text()})
  serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
  split_infos = []
  for split, texts in splits.items():
    path = os.path.join(out_dir, f"{name}-{split}.array_record-00000-of-00001")
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for text in texts:
      writer.write(serializer.serialize_example(features.encode_example({feature: text})))
    writer.close()
    split_infos.append(splits_lib.SplitInfo(
        name=split, shard_lengths=[len(texts)], num_bytes=os.path.getsize(path)))
  tfds.folder_dataset.write_metadata(
      data_dir=out_dir, features=features, split_infos=split_infos, check_data=False)
  return out_dir


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--name", required=True)
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--split", action="append", required=True,
                      help="SPLIT:GLOB (repeatable); each matching file becomes one example")
  args = parser.parse_args()
  splits = {}
  for spec in args.split:
    split, _, pattern = spec.partition(":")
    paths = sorted(glob.glob(pattern, recursive=True))
    if not paths:
      raise SystemExit(f"--split {spec!r}: glob matched no files")
    splits[split] = [open(p, encoding="utf-8", errors="replace").read() for p in paths]
  print(write_text_dataset(args.name, args.data_dir, splits))


if __name__ == "__main__":
  main()
