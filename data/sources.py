"""Random-access document sources (`len(src)`, `src[i] -> str`); usable directly as grain sources.

Source strings (the `data.source` config flag):
  'stdlib'                the embedded default corpus: the .py files of the Python standard library
  'pydoc'                 English prose every Python has: the pydoc topics (pydoc_data), one
                          document per topic (about 465K characters)
  'glob:PATTERN'          text files matching PATTERN ('**' allowed)
  'tfds:NAME[:FEATURE]'   a prepared tfds dataset (ArrayRecord), read with download=False
  'ac:SOURCE'             SOURCE with an <AC> anchor after every sentence end (data/ac.py)
('synthetic:TASK' sources yield token arrays, not text; see data/synthetic.py and data/pipeline.py.)

Splits for file sources are 'train' and 'eval', held out by file: a file is in 'eval' when a stable
hash (sha1) of its path relative to the corpus root falls in the lowest EVAL_PERCENT percent;
'all' is every file (evaluate.py --split=all: a corpus, or a single file, held out as a whole).
A glob of binary files (NUL bytes), or of another encoding than UTF-8, is refused (check_text).
"""

import glob
import hashlib
import logging
import os
import sysconfig

EVAL_PERCENT = 3
SPLITS = ("train", "eval", "all")
# A glob with more than this fraction of its bytes not UTF-8 is refused (another encoding);
# below it, the odd bytes become U+FFFD with a warning. A file with a NUL byte is binary.
MAX_BAD_BYTES = 0.01
_SITE_DIRS = ("site-packages", "dist-packages")


class SourceError(ValueError):
  """A data.source (or data.tokenizer) that cannot be read: the message names the key."""


def check_text(paths: list[str]) -> None:
  """SourceError unless `paths` are text: a file with a NUL byte is binary, and over
  MAX_BAD_BYTES of all bytes not UTF-8 is a corpus in another encoding. Fewer odd bytes (a
  Latin-1 file among UTF-8 ones) are read as U+FFFD, with a warning."""
  bad, total, odd = 0, 0, []
  for path in paths:
    with open(path, "rb") as f:
      data = f.read()
    if b"\0" in data:
      raise SourceError(f"data.source: {path} is not a text file (it has NUL bytes); narrow "
                        "the glob to text files (e.g. glob:DIR/**/*.txt)")
    total += len(data)
    try:
      data.decode("utf-8")
    except UnicodeDecodeError:
      text = data.decode("utf-8", errors="replace")
      bad += text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
      odd.append(path)
  if bad > MAX_BAD_BYTES * total:
    raise SourceError(f"data.source: {bad} of {total} bytes in {len(odd)} file(s) are not "
                      f"UTF-8 (e.g. {odd[0]}): convert the corpus to UTF-8 or narrow the glob")
  if odd:
    logging.warning("data.source: %d byte(s) in %d file(s) are not UTF-8 (e.g. %s); read as "
                    "U+FFFD", bad, len(odd), odd[0])


class FileDocuments:
  """Text files read on access (UTF-8, errors='replace')."""

  def __init__(self, paths: list[str]):
    self.paths = list(paths)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> str:
    with open(self.paths[index], encoding="utf-8", errors="replace") as f:
      return f.read()


class TfdsDocuments:
  """One text feature of a tfds random-access data source."""

  def __init__(self, data_source, feature: str):
    self.data_source = data_source
    self.feature = feature

  def __len__(self) -> int:
    return len(self.data_source)

  def __getitem__(self, index: int) -> str:
    value = self.data_source[index][self.feature]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _hash_percent(relpath: str) -> int:
  return int(hashlib.sha1(relpath.encode("utf-8")).hexdigest()[:8], 16) % 100


def split_files(root: str, paths: list[str], split: str) -> list[str]:
  """The sorted files of `split`; if hashing leaves 'eval' empty, the file of lowest hash goes
  there. 'all': every file."""
  if split not in SPLITS:
    raise SourceError(f"data.source: split must be one of {SPLITS}, got {split!r}")
  if split == "all":
    return sorted(paths)
  rel = {p: os.path.relpath(p, root).replace(os.sep, "/") for p in paths}
  is_eval = {p: _hash_percent(r) < EVAL_PERCENT for p, r in rel.items()}
  if len(paths) >= 2 and not any(is_eval.values()):
    is_eval[min(paths, key=lambda p: hashlib.sha1(rel[p].encode("utf-8")).hexdigest())] = True
  return sorted(p for p in paths if is_eval[p] == (split == "eval"))


def stdlib_documents(split: str) -> FileDocuments:
  """The .py files of the running interpreter's standard library (site/dist-packages excluded)."""
  root = sysconfig.get_paths()["stdlib"]
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SITE_DIRS and d != "__pycache__")
    paths += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
  return FileDocuments(split_files(root, paths, split))


class TextDocuments(list):
  """Documents held as strings."""


def pydoc_documents(split: str) -> TextDocuments:
  """The pydoc topics of the running interpreter, one document per topic, split by a hash of
  the topic's name as files are."""
  import pydoc_data.topics
  topics = pydoc_data.topics.topics
  names = split_files(".", list(topics), split)
  return TextDocuments(topics[n] for n in names)


def glob_documents(pattern: str, split: str) -> FileDocuments:
  """Text files matching `pattern` (recursive '**' allowed), split by hashed relative path;
  checked to be text (check_text: one more read of the files, the OS caches them)."""
  paths = [p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)]
  if not paths:
    raise SourceError(f"data.source: glob {pattern!r} matched no files")
  root = _glob_root(pattern)
  docs = FileDocuments(split_files(root, paths, split))
  check_text(docs.paths)
  if not len(docs):
    raise SourceError(f"data.source: glob {pattern!r} has no files in split {split!r} "
                     f"({len(paths)} file(s) in all; 'eval' needs at least 2: score a whole "
                     "source, or a single file, with evaluate.py --source)")
  return docs


def _glob_root(pattern: str) -> str:
  """The directory part of `pattern` before its first wildcard."""
  parts = os.path.expanduser(pattern).split(os.sep)
  fixed = []
  for part in parts[:-1]:
    if glob.has_magic(part):
      break
    fixed.append(part)
  return os.sep.join(fixed) or "."


def tfds_documents(name: str, split: str, data_dir: str | None = None,
                   feature: str = "text") -> TfdsDocuments:
  """A prepared tfds dataset, read via `tfds.data_source(..., download=False)` (no TensorFlow).

  `name` may carry a config/version ('wiki40b/en:1.3.0'). split='eval' resolves to the first of
  'eval', 'validation', 'test' that the dataset has; other split strings go to tfds unchanged.
  """
  from etils import epath  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import constants  # pylint: disable=g-import-not-at-top

  data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or constants.DATA_DIR
  dataset_dir = epath.Path(data_dir).expanduser() / name.split(":")[0]
  if not any(dataset_dir.glob("*/dataset_info.json")) and not any(  # version or config/version
      dataset_dir.glob("*/*/dataset_info.json")):
    raise SourceError(
        f"data.source: tfds dataset {name!r} is not prepared in data_dir {data_dir!r} "
        f"(no {dataset_dir}/[CONFIG/]VERSION/dataset_info.json). No download is attempted: prepare it first "
        "in ArrayRecord format (e.g. `tfds build NAME --file_format=array_record "
        "--data_dir=DIR`, or data/tfds_writer.py for your own text), then pass its data_dir.")
  builder = tfds.builder(name, data_dir=data_dir)
  if split == "eval":
    split = next((s for s in ("eval", "validation", "test") if s in builder.info.splits), split)
  source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  return TfdsDocuments(source, feature)


def get_documents(source: str, split: str, tfds_data_dir: str | None = None):
  """Dispatches a `data.source` string: 'stdlib', 'glob:PATTERN', 'tfds:NAME[:FEATURE]'."""
  if source.startswith("ac:"):  # AnLLM-AC: <AC> after every sentence end (data/ac.py)
    from data.ac import ACDocuments  # pylint: disable=g-import-not-at-top
    return ACDocuments(get_documents(source[len("ac:"):], split, tfds_data_dir))
  if source == "stdlib":
    return stdlib_documents(split)
  if source == "pydoc":
    return pydoc_documents(split)
  if source.startswith("glob:"):
    return glob_documents(source[len("glob:"):], split)
  if source.startswith("tfds:"):
    name, _, feature = source[len("tfds:"):].partition(":")
    if feature and feature[0].isdigit():  # 'tfds:NAME:1.0.0' is a version, not a feature
      name, feature = f"{name}:{feature}", ""
    return tfds_documents(name, split, tfds_data_dir, feature or "text")
  if source.startswith("synthetic:"):
    raise SourceError(f"data.source: {source!r} yields token arrays, not text: use "
                     "data.synthetic.synthetic_documents or data.pipeline")
  raise SourceError(f"data.source: unknown source {source!r}; expected 'stdlib', 'pydoc', 'glob:PATTERN', "
                   "'tfds:NAME[:FEATURE]' or 'synthetic:TASK'")
