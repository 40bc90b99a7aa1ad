"""Tests for data/: tokenizer, sources, tfds offline round trip, synthetic tasks, grain pipeline."""

import re

import numpy as np
import pytest

from data import pipeline
from data import sources
from data import synthetic
from data import tfds_writer
from data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


# --- tokenizer ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "plain ascii", "<AC>", "a<AC>b<AC><AC>c", "<AC", "AC>",
                                  "héllo wörld ✓ 日本語 \U0001F600", "lone \ud800 surrogate"])
def test_tokenizer_round_trip(text):
  ids = TOK.encode(text, bos=True, eos=True)
  assert ids.dtype == np.int32
  assert ids[0] == TOK.BOS and ids[-1] == TOK.EOS
  assert TOK.decode(ids) == text


def test_tokenizer_special_ids():
  assert (TOK.PAD, TOK.BOS, TOK.EOS, TOK.AC, TOK.vocab_size) == (256, 257, 258, 259, 260)
  assert TOK.encode("x<AC>y").tolist() == [ord("x"), TOK.AC, ord("y")]
  assert TOK.encode("é").tolist() == [0xC3, 0xA9]
  assert TOK.decode([TOK.PAD, TOK.BOS, 104, 105, TOK.AC, TOK.EOS, TOK.PAD]) == "hi<AC>"
  assert TOK.decode([0xFF, 65]) == "\ufffdA"  # invalid bytes are replaced


# --- sources -----------------------------------------------------------------------------------

def test_stdlib_split_disjoint_and_non_empty():
  train, eval_ = sources.stdlib_documents("train"), sources.stdlib_documents("eval")
  assert len(train) > 500 and len(eval_) > 10
  assert not set(train.paths) & set(eval_.paths)
  assert 0.01 < len(eval_) / (len(train) + len(eval_)) < 0.06
  assert not any("site-packages" in p or "dist-packages" in p for p in train.paths)
  assert isinstance(eval_[0], str)
  assert sources.stdlib_documents("eval").paths == eval_.paths  # deterministic


def test_glob_source(tmp_path):
  for i in range(5):
    (tmp_path / "sub").mkdir(exist_ok=True)
    (tmp_path / "sub" / f"{i}.txt").write_text(f"document {i}")
  pattern = str(tmp_path / "**" / "*.txt")
  train = sources.get_documents(f"glob:{pattern}", "train")
  eval_ = sources.get_documents(f"glob:{pattern}", "eval")
  assert len(train) + len(eval_) == 5 and len(eval_) >= 1
  assert not set(train.paths) & set(eval_.paths)
  assert train[0].startswith("document")


def test_glob_empty_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match=r"data.source: glob .*nothing.*matched no files"):
    sources.get_documents(f"glob:{tmp_path}/nothing/*.txt", "train")


def test_glob_of_binary_or_other_encodings_is_refused(tmp_path, caplog):
  """NUL bytes: binary, refused. Over 1% of the bytes not UTF-8: another encoding, refused;
  fewer (a Latin-1 file among UTF-8 ones, as in the stdlib's tests): read, with a warning."""
  (tmp_path / "a.txt").write_text("plain text\n" * 100)
  (tmp_path / "b.dat").write_bytes(b"\x7fELF\x02\x01\x01\x00" * 4)
  with pytest.raises(sources.SourceError, match=r"b.dat is not a text file \(it has NUL bytes\)"):
    sources.get_documents(f"glob:{tmp_path}/*", "all")
  (tmp_path / "b.dat").write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 20)   # 40 of 220 bytes
  with pytest.raises(sources.SourceError, match=r"40 of 1320 bytes in 1 file\(s\) are not UTF-8"):
    sources.get_documents(f"glob:{tmp_path}/*", "all")
  (tmp_path / "a.txt").write_text("plain text\n" * 1000)             # now 40 of 11220: read
  docs = sources.get_documents(f"glob:{tmp_path}/*", "all")
  assert len(docs) == 2 and "caf\ufffd" in docs[1]
  assert "40 byte(s) in 1 file(s) are not UTF-8" in caplog.text


def test_split_all_is_every_file(tmp_path):
  for i in range(5):
    (tmp_path / f"{i}.txt").write_text(f"document {i}")
  split = lambda s: sources.get_documents(f"glob:{tmp_path}/*.txt", s).paths
  assert split("all") == sorted(split("train") + split("eval")) and len(split("all")) == 5
  assert len(sources.get_documents(f"glob:{tmp_path}/0.txt", "all")) == 1


def test_unknown_source_names_the_flag():
  with pytest.raises(ValueError, match="data.source"):
    sources.get_documents("hdfs:foo", "train")
  with pytest.raises(ValueError, match="data.source"):
    pipeline.make_train_iterator("synthetic:nosuch", "train", 64, 2, 0)


# --- tfds, offline and without TensorFlow -------------------------------------------------------

def test_tfds_offline_round_trip(tmp_path):
  train_texts = [f"train document {i}: héllo <AC> " + "x" * i for i in range(40)]
  tfds_writer.write_text_dataset("tiny_text", str(tmp_path),
                                 {"train": train_texts, "validation": ["held out ✓"]})
  docs = sources.tfds_documents("tiny_text", "train", str(tmp_path))
  assert [docs[i] for i in range(len(docs))] == train_texts
  assert sources.get_documents("tfds:tiny_text:text", "eval", str(tmp_path))[0] == "held out ✓"

  it = pipeline.make_train_iterator("tfds:tiny_text", "train", 32, 4, seed=0,
                                    tfds_data_dir=str(tmp_path))
  tokens = next(it)["tokens"]
  assert tokens.shape == (4, 33) and tokens.dtype == np.int32
  stream = np.concatenate([TOK.encode(t, bos=True, eos=True) for t in train_texts])
  windows = {tuple(w) for w in stream[:len(stream) // 33 * 33].reshape(-1, 33)}
  assert all(tuple(row) in windows for row in tokens)


def test_tfds_missing_dataset_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match=r"'no_such_ds'.*not prepared.*No download"):
    sources.get_documents("tfds:no_such_ds", "train", str(tmp_path))


# --- synthetic tasks ---------------------------------------------------------------------------

@pytest.mark.parametrize("task", synthetic.TASKS)
def test_task_batch_layout(task):
  length = 1024
  batch = synthetic.make_task_batch(task, 3, length, depth=0.5, seed=0, split="eval")
  tokens_BxL, mask_BxL = batch["tokens_BxL"], batch["answer_mask_BxL"]
  assert tokens_BxL.shape == mask_BxL.shape == (3, length) and tokens_BxL.dtype == np.int32
  assert (tokens_BxL[:, 0] == TOK.BOS).all() and not mask_BxL[:, -1].any()
  for b in range(3):
    targets = tokens_BxL[b, 1:][mask_BxL[b, :-1]]
    assert targets.tolist() == batch["answer_BxA"][b].tolist()
    p = batch["prompt_len_B"][b]
    assert p + len(targets) == length  # prompt padded with filler to hit the length exactly
    answer = TOK.decode(targets).split()
    assert all(a in TOK.decode(tokens_BxL[b, :p]) for a in answer)  # answer is in the prompt


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_passkey_depth(depth):
  example = synthetic.passkey(7, 4096, depth)
  assert len(example["prompt"]) == 4096
  text = TOK.decode(example["prompt"])
  key = TOK.decode(example["answer"]).strip()
  assert text.endswith("What is the pass key? The pass key is")
  assert abs(text.index(f"The pass key is {key}.") / len(text) - depth) < 0.05


def test_niah_needles():
  example = synthetic.niah(3, 2048, depth=0.3, n_needles=5)
  text = TOK.decode(example["prompt"])
  assert text.count("The special magic number for") == 5 + 1  # needles + the question's answer stem
  value = TOK.decode(example["answer"]).strip()
  assert len(value) == 7 and abs(text.index(f"is {value}.") / len(text) - 0.3) < 0.05


def test_kv_tasks():
  """kv / kv4 / kvlocal: letters filler, "K v" needles, lone distractor keys, "?K" -> v; kvlocal's
  pair is among the last tokens, kv's sits at the requested depth; every key from another
  group, each value from its key's group."""
  for seed in range(4):
    for task, n_pairs in (("kv", 1), ("kv4", 4), ("kvlocal", 1)):
      e = synthetic.make_example(task, seed, 320, depth=0.25)
      text, value = TOK.decode(e["prompt"]), TOK.decode(e["answer"])
      assert len(e["prompt"]) == 319 and len(value) == 1 and not value.isalpha()
      assert text[-2] == "?" and text[-1].isupper()
      key = text[-1]
      assert len(re.findall(r"[A-Z][^a-zA-Z?]", text)) == n_pairs     # key + value needles
      assert len(re.findall(r"[A-Z]", text[:-1])) == (3 if n_pairs == 1 else 4)
      at = text.index(key + value)
      group = lambda c, parts: [ord(c) in p for p in parts].index(True)
      keys = re.findall(r"[A-Z]", text[:-1])
      assert len({group(k, synthetic._KV_KEYS) for k in keys}) == len(keys)
      assert group(key, synthetic._KV_KEYS) == group(value, synthetic._KV_VALUES)
      if task == "kvlocal":
        assert len(text) - 2 - at <= synthetic._KV_LOCAL + 2
      elif task == "kv":
        assert abs(at / len(text) - 0.25) < 0.05


def test_synthetic_split_and_determinism():
  a = synthetic.make_task_batch("passkey", 8, 256, seed=0, split="train")
  b = synthetic.make_task_batch("passkey", 8, 256, seed=0, split="train")
  e = synthetic.make_task_batch("passkey", 8, 256, seed=0, split="eval")
  assert (a["tokens_BxL"] == b["tokens_BxL"]).all()
  train_rows = {tuple(r) for r in a["tokens_BxL"]}
  assert not train_rows & {tuple(r) for r in e["tokens_BxL"]}
  train_seeds = {synthetic.example_seed(s, i, "train") for s in range(4) for i in range(100)}
  eval_seeds = {synthetic.example_seed(s, i, "eval") for s in range(4) for i in range(100)}
  assert not train_seeds & eval_seeds


def test_synthetic_train_source():
  it = pipeline.make_train_iterator("synthetic:passkey", "train", 255, 4, seed=1)
  batch = next(it)
  tokens = batch["tokens"]
  assert tokens.shape == (4, 256) and (tokens[:, 0] == TOK.BOS).all()
  assert (tokens != TOK.PAD).all() and (batch["weights"] == 1).all()


def test_answer_loss_weights_exactly_the_answer_targets():
  """data.loss=answer: weight 1 on the targets that are answer tokens (the ' NNNNN' after
  'The pass key is' at the end, or kv's value after '?K'), 0 on every other target; same
  tokens as without."""
  args = ("mix:synthetic:passkey+synthetic:kv", "train", 127, 4)
  batch = next(pipeline.make_train_iterator(*args, seed=2, answer_loss=True))
  plain = next(pipeline.make_train_iterator(*args, seed=2))
  assert (batch["tokens"] == plain["tokens"]).all() and batch["weights"].shape == (4, 127)
  for tokens, w in zip(batch["tokens"], batch["weights"]):
    text = TOK.decode(tokens)
    if "The pass key is" in text:
      answer = text[text.rindex("The pass key is") + len("The pass key is"):]
      assert re.fullmatch(r" \d{5}", answer)
    else:
      answer = text[text.rindex("?") + 2:]
      assert len(answer) == 1 and text[text.rindex("?") + 1].isupper()
    assert w.tolist() == [0.] * (127 - len(answer)) + [1.] * len(answer)


def test_eval_batches_of_a_mix_take_every_part():
  """Held-out batches of a mix hold every part in turn (not only the first)."""
  batches = pipeline.make_eval_batches("mix:stdlib+synthetic:kv", 127, 4, 2)
  is_kv = [TOK.decode(row)[-3] == "?" for b in batches for row in b]
  assert is_kv == [False, True] * 4


# --- pipeline ----------------------------------------------------------------------------------

def _take(it, n):
  return [next(it)["tokens"] for _ in range(n)]


def test_pipeline_determinism_and_resume():
  args = dict(source="stdlib", split="train", seq_len=128, global_batch=4, seed=3)
  it = pipeline.make_train_iterator(**args)
  first = _take(it, 3)
  state = it.get_state()
  after = _take(it, 2)
  assert all(b.shape == (4, 129) and b.dtype == np.int32 for b in first + after)
  again = _take(pipeline.make_train_iterator(**args), 5)
  assert all((x == y).all() for x, y in zip(first + after, again))
  restored = pipeline.make_train_iterator(**args)
  restored.set_state(state)
  assert all((x == y).all() for x, y in zip(after, _take(restored, 2)))
  other_seed = next(pipeline.make_train_iterator(**{**args, "seed": 4}))["tokens"]
  assert not (other_seed == first[0]).all()


def test_pipeline_grain_checkpoint_handler(tmp_path):
  import grain  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  args = dict(source="stdlib", split="train", seq_len=64, global_batch=2, seed=0)
  it = pipeline.make_train_iterator(**args)
  _take(it, 2)
  with ocp.CheckpointManager(tmp_path, item_handlers={"data": grain.checkpoint.CheckpointHandler()}
                             ) as mngr:
    mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = _take(it, 2)
  restored = pipeline.make_train_iterator(**args)
  with ocp.CheckpointManager(tmp_path, item_handlers={"data": grain.checkpoint.CheckpointHandler()}
                             ) as mngr:
    mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  assert all((x == y).all() for x, y in zip(expected, _take(restored, 2)))


def test_a_failed_process_exits_at_once_with_bounded_memory(tmp_path):
  """The train iterator reads data.prefetch batches ahead with data.read_threads threads:
  after an error the process exits at once. (grain's defaults, 500 batches and 16 threads,
  held 2.3 GB here and kept the failed process alive for 15 s.)"""
  import subprocess
  import sys
  from configs.base import get_base_config
  from conftest import ROOT
  d = get_base_config().data
  (tmp_path / "a.txt").write_text("the quick brown fox " * 100_000)
  script = f"""
import atexit, re, time
from data import pipeline
it = pipeline.make_train_iterator('glob:{tmp_path}/a.txt', 'train', 2048, 256, 0,
                                  read_threads={d.read_threads}, prefetch={d.prefetch})
next(it)
t = time.time()
peak_kb = lambda: re.search(r'VmHWM:\s+(\d+)', open('/proc/self/status').read()).group(1)
atexit.register(lambda: print(time.time() - t, peak_kb()))   # (ru_maxrss counts the forking parent)
raise RuntimeError('an error in the step')
"""
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  assert "an error in the step" in out.stderr
  seconds, max_rss_kb = map(float, out.stdout.split())
  assert seconds < 2 and max_rss_kb < 1e6, (seconds, max_rss_kb)


def test_pipeline_process_sharding():
  args = dict(source="stdlib", split="train", seq_len=64, global_batch=8, seed=0)
  full = _take(pipeline.make_train_iterator(**args), 2)
  parts = [_take(pipeline.make_train_iterator(**args, process_index=p, process_count=2), 2)
           for p in range(2)]
  for step in range(2):
    a, b = parts[0][step], parts[1][step]
    assert a.shape == b.shape == (4, 65)
    assert not {tuple(r) for r in a} & {tuple(r) for r in b}
    # Together the two processes cover exactly the single-process global batch.
    assert sorted(map(tuple, np.concatenate([a, b]))) == sorted(map(tuple, full[step]))


def test_eval_batches_and_unigram_baseline():
  batches = pipeline.make_eval_batches("stdlib", 128, 4, 3)
  assert len(batches) == 3 and all(b.shape == (4, 129) for b in batches)
  again = pipeline.make_eval_batches("stdlib", 128, 4, 3)
  assert all((x == y).all() for x, y in zip(batches, again))
  train_rows = {tuple(r) for r in _take(pipeline.make_train_iterator("stdlib", "train", 128, 64, 0), 4)[0]}
  assert not train_rows & {tuple(r) for b in batches for r in b}
  entropy = pipeline.unigram_entropy("stdlib")
  assert 2.5 < entropy < 4.5
  synth = pipeline.make_eval_batches("synthetic:niah", 511, 4, 2, process_index=1, process_count=2)
  assert [b.shape for b in synth] == [(2, 512)] * 2


def test_mixed_source_interleaves_parts(tmp_path):
  """'mix:A+B' alternates windows of A and B; a bad mix names data.source."""
  src = 'mix:stdlib+synthetic:passkey'
  windows = pipeline._windows(src, 'train', 256)
  is_passkey = lambda r: b'pass key' in bytes(r[r < 256].astype(np.uint8))
  assert [is_passkey(windows[i]['tokens']) for i in range(4)] == [False, True, False, True]
  assert next(pipeline.make_train_iterator(src, 'train', 255, 4, seed=0))['tokens'].shape == (4, 256)
  evals = pipeline.make_eval_batches(src, 255, 4, 2)
  assert [b.shape for b in evals] == [(4, 256)] * 2
  assert not pipeline.is_text(src) and pipeline.is_text('stdlib')
  with pytest.raises(ValueError, match='data.source'):
    pipeline.make_train_iterator('mix:stdlib', 'train', 255, 4, seed=0)
