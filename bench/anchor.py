"""AnLLM / AnSAN reproduction at CPU scale (spec C2). Writes bench/results/OUT.{md,json,png}
(--out, default anchor).

  python bench/anchor.py [--work=/tmp/anchor_bench] [--base_steps=1500] [--cont_steps=300]
      [--n_layers=4]

1. A sentence-structured corpus with cross-sentence facts (bench/anchor_corpus.py).
2. Base: a full-attention LM (configs/transformer.py:tiny sizes but n_layers layers, seq_len
   256) via train.py.
3. Continued pretraining from the base via train.py --config.train.init_from, the same steps
   for each (by default 20% of the base's steps at a third of its learning rate, as spec C2
   asks): full attention (control), AnSAN-EP ('.' and '\\n' anchors), AnSAN-AC (<AC> after
   every sentence end, its embedding initialised from '.').
4. Held-out loss per original byte (<AC> targets excluded) under full attention and under the
   anchor mask (the base model under the mask = zero-shot), KV cache kept after a prefill with
   the anchor policy, the fact-recall probe (answer k+2 sentences back; chance 10%) and the
   chain probe (the previous sentence's object, which passes through its anchor), decode
   speed of the anchor model: pruned cache vs full cache vs no cache (full recompute).
The runs train in this process (bench.common.train_command); the page lists them as the
train.py commands they equal. Re-running resumes: finished runs return at once.
"""
import argparse
import functools
import json
import os
import platform
import sys
import time

import numpy as np

from bench import provenance
from bench.anchor_page import write
from bench.common import run_study, train_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEASURES = provenance.CORE + ('models/anchor.py', 'data/ac.py')   # the code the rows measure

SEQ = 256
LONG = 2048      # a second, longer prefix for the KV cache reduction
COMMON = ('--config.model.n_layers={layers} --config.data.seq_len={seq} '
          '--config.train.log_every=50 '
          '--config.data.source={source}')
BASE = ('python train.py --config=configs/transformer.py:tiny --workdir={w} '
        '--config.train.steps={steps} --config.train.warmup_steps=50 '
        '--config.train.eval_every=500 --config.train.ckpt_every=250 ' + COMMON)
CONT = ('python train.py --config={config} --workdir={w} --config.train.init_from={base} '
        '--config.train.steps={steps} --config.train.lr=1e-3 --config.train.warmup_steps=5 '
        '--config.train.eval_every={steps} --config.train.ckpt_every={steps} ' + COMMON)
RUNS = {'full': 'configs/transformer.py:tiny', 'ep': 'configs/anchor_ep.py:tiny',
        'ac': 'configs/anchor_ac.py:tiny'}


def model_cfg(mixer, mode, n_layers):
  from configs.transformer import get_config
  from training.config import resolve
  cfg = get_config('tiny')
  cfg.model.mixer, cfg.model.anchor.mode, cfg.data.seq_len = mixer, mode, SEQ
  cfg.model.n_layers = n_layers
  return resolve(cfg)


def restore(workdir, cfg):
  """The checkpoint's parameters in a model built from `cfg` (any mixer with the same
  parameters: attention <-> anchor)."""
  from flax import nnx
  from training import mesh as meshlib
  from training.checkpoint import Checkpointer
  from training.run import abstract_model, restore_model
  ckpt = Checkpointer.open(workdir)
  try:
    graphdef, abs_state = abstract_model(cfg, meshlib.make_mesh(cfg))
    return nnx.merge(graphdef, restore_model(ckpt, ckpt.step(), abs_state))
  finally:
    ckpt.close()


def held_out_loss(model, source, batches=8):
  """Mean nll per held-out target that is not <AC> (so AC runs are scored per original byte)."""
  import jax
  import jax.numpy as jnp
  from data import pipeline
  from data.tokenizer import ByteTokenizer
  from training.step import token_nll
  fn = jax.jit(lambda x: token_nll(model, x))
  tot = n = 0.0
  for b in pipeline.make_eval_batches(source, SEQ, 16, batches):
    nll, mask = fn(jnp.asarray(b))
    mask = mask & (jnp.asarray(b)[:, 1:] != ByteTokenizer.AC)
    tot += float((nll * mask).sum())
    n += float(mask.sum())
  return tot / n


def probe_accuracy(model, ks, n=200, ac=False):
  """The fact probe per distance k (sentences of filler) and the chain probe ('chain')."""
  from bench.anchor_corpus import chain_probe, probe
  out = {k: answer_accuracy(model, probe(k, n), ac) for k in ks}
  out['chain'] = answer_accuracy(model, chain_probe(n), ac)
  return out


def answer_accuracy(model, pairs, ac=False):
  """Teacher-forced exact match: the fraction of (prefix, answer) pairs whose every answer
  token is the model's argmax (<AC> inserted into the text first when `ac`)."""
  import jax
  import jax.numpy as jnp
  from data.ac import insert_ac
  from data.tokenizer import ByteTokenizer
  tok = ByteTokenizer()
  prefixes = [tok.encode(insert_ac(p) if ac else p, bos=True) for p, _ in pairs]
  full = [np.concatenate([q, tok.encode(a)]) for q, (_, a) in zip(prefixes, pairs)]
  x = np.full((len(full), -(-max(map(len, full)) // 64) * 64), tok.PAD, np.int32)
  for r, ids in enumerate(full):
    x[r, :len(ids)] = ids
  pred = np.asarray(jax.jit(lambda x: model(x)[0].argmax(-1))(jnp.asarray(x)))
  return float(np.mean([(pred[r, len(q) - 1:len(f) - 1] == f[len(q):]).all()
                        for r, (q, f) in enumerate(zip(prefixes, full))]))


def kv_kept(model, source, length=SEQ):
  """Tokens kept per layer after prefilling held-out windows of `length` tokens (chunks of
  32). What is kept depends only on the tokens (anchors + the current sentence), not on the
  weights, so a prefix longer than the training length measures the rule on more text."""
  import jax
  import jax.numpy as jnp
  from data import pipeline
  from models import decode
  from models.anchor import AnchorPolicy
  b = jnp.asarray(pipeline.make_eval_batches(source, length, 16, 1)[0][:, :length])

  @jax.jit
  def run(x):
    state = decode.init_state(model, x.shape[0], length, AnchorPolicy())
    _, state = decode.prefill(model, x, state, AnchorPolicy(), chunk=32)
    return jnp.stack([s.size_BxK().astype(jnp.float32).mean() for s in state])

  return float(run(b).mean())


def sentence_lengths(source, rule):
  """(mean, length-biased mean) tokens per sentence of the held-out documents: the second,
  E[L^2] / E[L], is the mean length of the sentence a random token sits in."""
  from data.sources import get_documents
  from data.tokenizer import ByteTokenizer
  tok = ByteTokenizer()
  lengths = []
  for doc in get_documents(source, 'eval'):      # completed sentences: anchor to anchor
    ends = np.flatnonzero(np.asarray(rule.classify(tok.encode(doc)[None])[0][0]))
    lengths += list(np.diff(np.concatenate([[-1], ends])))
  L = np.asarray(lengths, float)
  return float(L.mean()), float((L ** 2).mean() / L.mean())


def pruned_capacity(tokens_BxT, rule, chunk=32):
  """Slots the anchor policy needs along these tokens (prompt read in chunks of `chunk`):
  the current document's anchors + its current sentence, + one chunk not yet pruned; rounded
  up to a multiple of `chunk`. A smaller cache would overwrite the oldest anchors."""
  anc, bos, _ = (np.asarray(a) for a in rule.classify(tokens_BxT))
  need = 0
  for a_T, b_T in zip(anc, bos):
    n_anc = since = 0              # the document's anchors so far, tokens since the last one
    for a, b in zip(a_T, b_T):
      if b:                        # a new document: nothing of the earlier one is visible
        n_anc = since = 0
      since += 1
      need = max(need, n_anc + since)
      if a:
        n_anc, since = n_anc + 1, 0
  return -(-(need + chunk) // chunk) * chunk


def decode_speed(model, source, n_new=128, B=4, reps=3):
  """Tokens/s of greedy decoding after a SEQ-token prompt: pruned cache (prompt read in
  chunks of 32; capacity from pruned_capacity over the full-cache output), full cache (SEQ +
  n_new slots, masked), no cache (the full forward of a SEQ + n_new buffer recomputed for
  every new token). Also: do the three give the same tokens?"""
  import jax
  import jax.numpy as jnp
  from data import pipeline
  from models import decode
  from models.anchor import AnchorPolicy
  prompt = jnp.asarray(pipeline.make_eval_batches(source, SEQ, B, 1)[0][:, :SEQ])
  full = functools.partial(decode.generate, model, n_new=n_new)
  capacity = min(pruned_capacity(full(prompt, jax.random.key(0))[0],
                                 model.blocks[0].mixer.rule), SEQ + n_new)
  pruned = functools.partial(decode.generate, model, n_new=n_new, capacity=capacity,
                             policy=AnchorPolicy(), prefill_chunk=32)

  @jax.jit
  def no_cache(prompt_BxP, key):
    del key
    buf = jnp.concatenate([prompt_BxP, jnp.zeros((B, n_new), jnp.int32)], 1)

    def body(i, buf):
      logits = model(buf)[0]
      tok = jax.lax.dynamic_index_in_dim(logits, SEQ + i - 1, 1, keepdims=False).argmax(-1)
      return jax.lax.dynamic_update_index_in_dim(buf, tok.astype(jnp.int32), SEQ + i, 1)

    return jax.lax.fori_loop(0, n_new, body, buf), None

  res, outs = {}, {}
  for name, fn in (('pruned cache', pruned), ('full cache', full), ('no cache', no_cache)):
    out = jax.block_until_ready(fn(prompt, jax.random.key(0))[0])      # compile
    t0 = time.time()
    for _ in range(reps):
      jax.block_until_ready(fn(prompt, jax.random.key(0))[0])
    res[name] = B * n_new * reps / (time.time() - t0)
    outs[name] = out
  same = bool((outs['pruned cache'] == outs['full cache']).all()
              and (outs['no cache'] == outs['full cache']).all())
  return dict(res, capacity=capacity), same


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--work', default='/tmp/anchor_bench')
  ap.add_argument('--base_steps', type=int, default=1500)
  ap.add_argument('--cont_steps', type=int, default=300)
  ap.add_argument('--n_layers', type=int, default=4,
                  help='depth of every model (2 layers give an anchor one attention step to '
                  'gather its sentence before the next sentence reads it)')
  ap.add_argument('--skip_speed', action='store_true')
  ap.add_argument('--reuse', action='store_true',
                  help='keep rows/speed of an existing bench/results/OUT.json; '
                  'evaluate only what is missing')
  ap.add_argument('--fillers', type=int, default=14, help='filler sentences per document')
  ap.add_argument('--facts', type=int, default=3, help='facts (each restated) per document')
  ap.add_argument('--corpus', default='chain', choices=('chain', 'mix'),
                  help='chain: the chained-sentence documents only; mix: half natural English '
                  '(the Python docs and docstrings of this interpreter), half chained documents; '
                  'the loss target is read on the first corpus')
  ap.add_argument('--chain_docs', type=int, default=3000, help='chained documents written')
  ap.add_argument('--out', default='anchor', help='page name: bench/results/OUT.{md,json,png}')
  ap.add_argument('--render', default='', help='only re-render the page of this saved JSON')
  args = ap.parse_args()
  if args.render:
    with open(args.render) as f:
      return write(json.load(f), args.out)
  from bench.anchor_corpus import write_corpus, write_prose
  W = args.work
  os.makedirs(W, exist_ok=True)
  if not os.path.isdir(os.path.join(W, 'corpus')):
    write_corpus(os.path.join(W, 'corpus'), n_docs=args.chain_docs, n_sentences=args.fillers,
                 n_facts=args.facts)
  texts = {'chain': f"glob:{os.path.join(W, 'corpus', '*.txt')}"}  # name -> held-out source
  if args.corpus == 'mix':
    texts = {'prose': f'glob:{write_prose(os.path.join(W, "prose"))}', **texts}
  joined = lambda parts: ('mix:' if len(parts) > 1 else '') + '+'.join(parts)
  src = joined(list(texts.values()))
  src_ac = joined([f'ac:{p}' for p in texts.values()])
  fmt = dict(seq=SEQ, layers=args.n_layers)
  cmds = {'base': BASE.format(w=f'{W}/base', steps=args.base_steps, source=f"'{src}'", **fmt)}
  for name, config in RUNS.items():
    cmds[name] = CONT.format(config=config, w=f'{W}/{name}', base=f'{W}/base',
                             steps=args.cont_steps, source=f"'{src_ac if name == 'ac' else src}'",
                             **fmt)
  secs = {name: train_command(cmd) for name, cmd in cmds.items()}   # in this process
  old = {}
  json_path = os.path.join(ROOT, 'bench', 'results', f'{args.out}.json')
  if args.reuse and os.path.exists(json_path):
    with open(json_path) as f:
      old = json.load(f)

  # --- Evaluation ---------------------------------------------------------------------------
  import jax
  from training.metrics import read_metrics
  ks = (0, 2, 4, 8)
  rows = []
  views = [  # (run, evaluated as, mixer, anchor mode, <AC> in the text)
      ('base', 'full attention', 'attention', 'ep', False),
      ('base', 'EP mask, zero-shot', 'anchor', 'ep', False),
      ('base', 'AC mask, zero-shot', 'anchor', 'ac', True),
      ('full', 'full attention', 'attention', 'ep', False),
      ('ep', 'EP mask', 'anchor', 'ep', False),
      ('ep', 'full attention', 'attention', 'ep', False),
      ('ac', 'AC mask', 'anchor', 'ac', True),
      ('ac', 'full attention', 'attention', 'ac', True),
  ]
  done = {(r['run'], r['view']): r for r in old.get('rows', [])}
  from models.anchor import init_ac_embedding
  from flax import nnx
  for run, view, mixer, mode, with_ac in views:
    row = done.get((run, view), {})
    if row and (mixer != 'anchor' or 'sentence' in row):
      rows.append(row)
      continue
    cfg = model_cfg(mixer, mode, args.n_layers)
    model = restore(f'{W}/{run}', cfg)
    if run == 'base' and mode == 'ac':      # the conversion train.init_from applies
      nnx.update(model, init_ac_embedding(cfg.model, nnx.state(model, nnx.Param)))
    sources = {k: f'ac:{v}' if with_ac else v for k, v in texts.items()}
    if not row:
      losses = {k: held_out_loss(model, v) for k, v in sources.items()}
      row = dict(run=run, view=view, loss=losses[next(iter(texts))], losses=losses,
                 probe=probe_accuracy(model, ks, ac=with_ac))
    if mixer == 'anchor':
      first = next(iter(sources.values()))
      row['kv_kept'] = kv_kept(model, first)
      row['kv_kept_long'] = kv_kept(model, first, LONG)
      row['sentence'] = sentence_lengths(first, model.blocks[0].mixer.rule)
    rows.append(row)
    print(row, flush=True)
  speed = old.get('speed', {})
  if not args.skip_speed and not speed:
    model = restore(f'{W}/ep', model_cfg('anchor', 'ep', args.n_layers))
    speed, same = decode_speed(model, next(iter(texts.values())))
    speed['outputs_identical'] = same
    print(speed, flush=True)
  steps = {n: max(read_metrics(f'{W}/{n}')) for n in cmds}
  secs = {**old.get('train_seconds', {}), **{n: t for n, t in secs.items() if t > 60}}
  command = ' '.join(['python bench/anchor.py'] + sys.argv[1:])
  report = dict(rows=rows, speed=speed, commands=cmds, train_seconds=secs, steps=steps,
                n_layers=args.n_layers, fillers=args.fillers, facts=args.facts,
                corpus=args.corpus, chain_docs=args.chain_docs,
                command=command,
                seq_len=SEQ, long=LONG, probe_ks=ks, machine=platform.platform(),
                cpu_count=os.cpu_count(), jax=jax.__version__,
                provenance=provenance.record(MEASURES, 0))
  write(report, args.out)


if __name__ == '__main__':
  run_study(main)
