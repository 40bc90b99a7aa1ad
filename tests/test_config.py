"""Bad input fails early with a message naming the key; nothing saved is lost."""
import os
import re
import shutil

import pytest

from conftest import losses, tiny_config
from training.checkpoint import CheckpointError, Checkpointer
from training.config import ConfigError, validate
from training.loop import train


@pytest.mark.parametrize('overrides,devices,message', [
    ({'model.n_heads': 3}, 1, r'config.model.n_heads: n_heads=3 does not divide d_model=64'),
    ({'model.n_kv_heads': 3}, 1, r'config.model.n_kv_heads'),
    ({'model.segment_len': 24}, 1, r'config.data.seq_len: seq_len=64 is not divisible by '
                                   r'model.segment_len=24'),
    ({'model.mixer': 'attention,titanz'}, 1, r"config.model.mixer: unknown mixer 'titanz'"),
    ({'mesh.data': 2}, 1, r'config.mesh: data\*fsdp\*tensor = 2 .* does not match the 1 '),
    ({'mesh.tensor': 3, 'mesh.data': -1}, 6, r'config.mesh.tensor: tensor=3 does not divide'),
    ({'train.batch_size': 6}, 4, r'config.train.batch_size: batch_size=6 is not divisible'),
    ({'train.microbatches': 3}, 2, r'config.train.microbatches: batch_size=8 is not divisible by '
                                   r'microbatches=3 x mesh data\*fsdp=2'),
    ({'train.xla_options': 'xla_cpu_bogus=1'}, 1,
     r"config.train.xla_options: .*No such compile option: 'xla_cpu_bogus'"),
    ({'train.xla_options': 'xla_cpu_ftz'}, 1, r"config.train.xla_options: 'xla_cpu_ftz' is not name"),
    ({'decode.policy': 'oracle'}, 1, r"config.decode.policy: unknown policy 'oracle'"),
    ({'model.attention_impl': 'flash'}, 1, r"config.model.attention_impl: 'flash' not xla"),
    ({'model.attention_block': 0}, 1, r'config.model.attention_block: must be >= 1, got 0'),
    ({'data.loss': 'answer'}, 1, r"config.data.loss: 'answer' needs task examples"),
    ({'evolve.cache_weight': -0.1}, 1, r'config.evolve.cache_weight: must be >= 0, got -0.1'),
    ({'model.mixer': 'titans_mac', 'model.titans.gate_bias': (0.0, 0.0)}, 1,
     r'config.model.titans.gate_bias: must be 3 numbers'),
    ({'model.attention_impl': 'cudnn'}, 1, r'config.model.attention_impl: cudnn needs model.dtype'),
    ({'model.attention_impl': 'cudnn', 'model.dtype': 'bfloat16'}, 1,
     r"config.model.attention_impl: cudnn needs a GPU, this platform is 'cpu'"),
])
def test_invalid_values_name_the_key(overrides, devices, message):
  with pytest.raises(ConfigError, match=message):
    validate(tiny_config(**overrides), devices)


def test_unknown_key_in_a_config_file_is_named():
  cfg = tiny_config()
  with cfg.unlocked():
    cfg.train.learning_rate = 1.0
  with pytest.raises(ConfigError, match=r'config.train.learning_rate: unknown key'):
    validate(cfg, 1)


def test_missing_tfds_dataset_and_empty_glob(tmp_path):
  with pytest.raises(ValueError, match='no_such_set'):
    train(tiny_config(**{'data.source': 'tfds:no_such_set', 'data.tfds_data_dir': str(tmp_path)}),
          tmp_path / 'a')
  with pytest.raises(ValueError, match=r"glob '.*\*.nothing' matched no files"):
    train(tiny_config(**{'data.source': f'glob:{tmp_path}/*.nothing'}), tmp_path / 'b')


def _flip_bits(step_dir, every=256):
  """A bit flipped every `every` bytes of the step's array data files: damage after saving
  (orbax then fails to read the arrays, or reads changed values)."""
  for f in step_dir.glob('state/ocdbt.process_*/d/*'):
    data = bytearray(f.read_bytes())
    for i in range(every // 2, len(data), every):
      data[i] ^= 0x10
    f.write_bytes(bytes(data))


def test_partial_and_damaged_checkpoints(tmp_path):
  """A half-written save is ignored; a damaged step (unreadable, or arrays that differ from
  the checksums saved with them) is skipped for the newest good one: evaluation reads step
  3, and training resumes there bit-exactly with the damaged step 6 set aside (renamed,
  never deleted). Every step damaged: a clear error, and nothing moved or deleted."""
  import json
  from training.run import load_run
  train(tiny_config(**{'train.steps': 6}), tmp_path)              # saves steps 3 and 6
  ckpts = tmp_path / 'checkpoints'
  partial = ckpts / '9.orbax-checkpoint-tmp-1234'                 # a save killed half-way
  os.makedirs(partial / 'state')
  assert Checkpointer.open(tmp_path).latest_step() == 6
  _flip_bits(ckpts / '6')
  assert load_run(tmp_path).step == 3
  with pytest.raises(CheckpointError, match=r'step 6 in .*(differ from the checksums|unreadable)'):
    load_run(tmp_path, step=6)
  first = losses(tmp_path)
  train(tiny_config(**{'train.steps': 6}), tmp_path)              # steps 4-6 again
  assert sorted(os.listdir(ckpts)) == ['3', '6', '6.unreadable', partial.name]
  again = losses(tmp_path)
  assert [again[s] for s in (4, 5, 6)] == [first[s] for s in (4, 5, 6)]
  # the new step 6 with one model array's recorded checksum off by one: that array is refused
  meta = ckpts / '6' / 'checksums' / 'metadata'
  sums = json.loads(meta.read_text())
  key = next(k for k in sums['state'] if k.startswith("['model']"))
  sums['state'][key] = (sums['state'][key] + 1) % 2**32
  meta.write_text(json.dumps(sums))
  assert load_run(tmp_path).step == 3
  with pytest.raises(CheckpointError, match=r"step 6 in .*1 array\(s\) of item 'state' differ "
                     r'from the checksums saved with them: its files changed after saving \(e.g. '
                     + re.escape(key)):
    load_run(tmp_path, step=6)
  for step in ('3', '6'):
    _flip_bits(ckpts / step)
  shutil.rmtree(ckpts / '6' / 'data')
  before = sorted(os.listdir(ckpts))
  with pytest.raises(CheckpointError, match=r'checkpoint step 6 in .*checkpoints is unreadable'):
    train(tiny_config(**{'train.steps': 9}), tmp_path)
  assert sorted(os.listdir(ckpts)) == before
