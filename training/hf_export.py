"""Export a trained checkpoint to a Hugging Face Llama directory (export_hf.py is the CLI).

The model is loaded on all devices (training/run.py load_run); parameters are gathered to the
host one at a time and written by process 0 (models/hf_llama.py export_hf), with the
tokenizer files of the run's hf: tokenizer (or source model) copied beside them.
"""
import os
import shutil

import jax
import numpy as np
from jax.experimental import multihost_utils

from data.tokenizer import AC_TEXT
from models import hf_llama
from training.run import load_run

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer.model', 'tokenizer_config.json',
                   'special_tokens_map.json', 'generation_config.json')


def model_params(state):
  """{mnemax parameter name: () -> full host array} of an (possibly sharded) model state."""
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return {hf_llama.param_name(p): (lambda x=x: gather(x)) for p, x in leaves}


def export_checkpoint(workdir, out_dir, *, step=None, dtype='float32'):
  """Writes OUT_DIR/config.json, model.safetensors and tokenizer files. Returns the step."""
  run = load_run(workdir, step)
  cfg = run.cfg
  source = cfg.train.init_from[len('hf:'):] if cfg.train.init_from.startswith('hf:') else ''
  base = hf_llama.read_config(source) if source else None
  writer = jax.process_index() == 0        # every process takes part in the gathers
  hf_llama.export_hf(model_params(run.state), cfg.model, out_dir, dtype=dtype,
                     base_config=base, write=writer)
  tok_dir = cfg.data.tokenizer[len('hf:'):] if cfg.data.tokenizer.startswith('hf:') else ''
  for name in TOKENIZER_FILES if tok_dir and writer else ():
    if os.path.isfile(os.path.join(tok_dir, name)):
      shutil.copy(os.path.join(tok_dir, name), os.path.join(out_dir, name))
  anchor = cfg.model.get('anchor')
  if tok_dir and writer and 'anchor' in cfg.model.mixer and anchor.mode == 'ac':
    add_ac_token(out_dir, int(anchor.ac_id))
  return run.step


def add_ac_token(out_dir, ac_id):
  """An AnLLM-AC model's tokenizer: "<AC>" added to OUT_DIR/tokenizer.json as a special token
  with the model's id (one past the source tokenizer's ids), so AutoTokenizer maps the text
  "<AC>" as training did."""
  import json
  import tokenizers
  path = os.path.join(out_dir, 'tokenizer.json')
  if not os.path.isfile(path):
    raise ValueError('an AC model needs <AC> in its tokenizer; only tokenizer.json '
                     '(the tokenizers package) can take a new token, not tokenizer.model')
  tok = tokenizers.Tokenizer.from_file(path)
  if tok.token_to_id(AC_TEXT) is None:
    tok.add_special_tokens([tokenizers.AddedToken(AC_TEXT, special=True, normalized=False)])
    tok.save(path)
  if tok.token_to_id(AC_TEXT) != ac_id:
    raise ValueError(f'<AC> is id {tok.token_to_id(AC_TEXT)} in the exported tokenizer, '
                     f'{ac_id} in the model')
  config_path = os.path.join(out_dir, 'tokenizer_config.json')
  if os.path.isfile(config_path):        # transformers reads added tokens from here too
    with open(config_path) as f:
      config = json.load(f)
    config.setdefault('added_tokens_decoder', {})[str(ac_id)] = dict(
        content=AC_TEXT, lstrip=False, normalized=False, rstrip=False, single_word=False,
        special=True)
    with open(config_path, 'w') as f:
      json.dump(config, f, indent=2)
