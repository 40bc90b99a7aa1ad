"""Evaluation of a trained checkpoint: held-out loss, loss by position, synthetic-task accuracy,
decode KV-cache size, and RULER's suite (ruler.tasks; training/ruler_eval.py). evaluate.py is
the CLI; `run` does everything and returns the report.

The checkpoint and its config (saved config < --config=file.py:preset < --config.x=y
overrides) are loaded by training/run.py load_run.

Task accuracy is exact match of every answer token. With decode.policy 'none' it is teacher
forcing on the full forward; otherwise the decode path: prefill all but the last prompt token
into a cache of decode.capacity slots (0: the whole example) under the policy, then feed the
last prompt token and the answer tokens one at a time with `decode.step`, so every answer
token is predicted from the (possibly evicted) cache.
"""
import functools
import json
import math
import os
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from data import pipeline, synthetic
from data.hf_tokenizer import get_tokenizer
from data.tokenizer import ByteTokenizer
from models import decode, registry
from training import mesh as meshlib, ruler_eval
from training.policy import make_policy
from training.run import load_run
from training.step import token_nll

# --- Jitted programs (closing over the graphdef; sizes are static) ------------------------

def make_programs(graphdef, prefill_chunk=0, pad_id=ByteTokenizer.PAD):
  """The jitted pieces for one model structure, taking its state as the first argument."""

  @jax.jit
  def position_nll(state, tokens_BxL1, weights_BxL):
    """Weighted sum of nll and of weights of real targets per position: ([L], [L])."""
    nll_BxL, mask_BxL = token_nll(nnx.merge(graphdef, state), tokens_BxL1, pad_id)
    w_BxL = mask_BxL * weights_BxL
    return (nll_BxL * w_BxL).sum(0), w_BxL.sum(0)

  @jax.jit
  def forward_predictions(state, tokens_BxL):
    """Teacher forcing: argmax prediction of tokens[:, t + 1] for every t, [B, L-1]."""
    logits_BxLxV, _ = nnx.merge(graphdef, state)(tokens_BxL[:, :-1])
    return logits_BxLxV.argmax(-1).astype(jnp.int32)

  @functools.partial(jax.jit, static_argnums=(2, 3))
  def decode_predictions(state, tokens_BxL, start, capacity, policy):
    """Decode path: prefill tokens[:, :start], then step tokens start..L-2 one at a time.

    Returns the argmax prediction of tokens[:, t + 1] at each stepped t, [B, L-1]
    (-1 for t < start, which are not predicted).
    """
    model = nnx.merge(graphdef, state)
    B, L = tokens_BxL.shape
    cache = decode.init_state(model, B, capacity, policy)
    _, cache = decode.prefill(model, tokens_BxL[:, :start], cache, policy, prefill_chunk)

    def body(cache, t):
      logits_BxV, cache = decode.step(model, tokens_BxL[:, t], jnp.full((B,), t, jnp.int32),
                                      cache, policy)
      return cache, logits_BxV.argmax(-1).astype(jnp.int32)

    _, pred_NxB = jax.lax.scan(body, cache, jnp.arange(start, L - 1))
    return jnp.concatenate([jnp.full((B, start), -1, jnp.int32), pred_NxB.T], 1)

  @functools.partial(jax.jit, static_argnums=(2,))
  def prefill_state(state, prompt_BxP, capacity, policy):
    model = nnx.merge(graphdef, state)
    cache = decode.init_state(model, prompt_BxP.shape[0], capacity, policy)
    return decode.prefill(model, prompt_BxP, cache, policy, prefill_chunk)[1]

  return types.SimpleNamespace(position_nll=position_nll,
                               forward_predictions=forward_predictions,
                               decode_predictions=decode_predictions,
                               prefill_state=prefill_state)


class Evaluator:
  """A loaded run (training/run.py Run) with the jitted programs that evaluate it."""

  def __init__(self, run):
    self.cfg, self.graphdef, self.state, self.mesh = run.cfg, run.graphdef, run.state, run.mesh
    self.policy = make_policy(self.cfg)
    self.tokenizer = get_tokenizer(self.cfg.data.tokenizer)
    self.programs = make_programs(self.graphdef, self.cfg.decode.prefill_chunk, self.tokenizer.PAD)

  def policy_for(self, prompt_tokens):
    """The policy with its budget from decode.compression_ratio for a prompt of this many
    tokens (the configured one when the ratio is 0)."""
    return make_policy(self.cfg, prompt_tokens)

  def put(self, x_Bx_):
    """A global host array onto the mesh: split over the batch axes when they divide B."""
    mesh = self.mesh
    shards = mesh.shape['data'] * mesh.shape['fsdp']
    sharding = meshlib.batch_sharding(mesh) if x_Bx_.shape[0] % shards == 0 else (
        meshlib.replicated(mesh))
    return jax.make_array_from_callback(x_Bx_.shape, sharding, lambda index: x_Bx_[index])

  def eval_batches(self):
    """The held-out (tokens, weights) batches training evaluates on: global [batch,
    seq_len + 1] and [batch, seq_len] arrays (data.loss=answer: only answers weigh), from
    split eval.split (data.eval_batches 0: all its windows)."""
    d = self.cfg.data
    return pipeline.make_eval_pairs(d.source, d.seq_len, self.cfg.train.batch_size,
                                    d.eval_batches, split=self.cfg.eval.split,
                                    tfds_data_dir=d.tfds_data_dir or None,
                                    tokenizer=d.tokenizer, answer_loss=d.loss == 'answer')

  def loss(self):
    """Per-token loss, perplexity and loss by equal position buckets on the held-out split
    (the targets training scores: with data.loss=answer, the answer tokens only)."""
    nll_L, count_L = 0.0, 0.0
    for tokens_BxL1, weights_BxL in self.eval_batches():
      s_L, n_L = self.programs.position_nll(self.state, self.put(tokens_BxL1),
                                            self.put(weights_BxL))
      nll_L, count_L = nll_L + _fetch(s_L).astype(np.float64), count_L + _fetch(n_L)
    loss = float(nll_L.sum() / max(count_L.sum(), 1))
    edges = np.linspace(0, len(nll_L), self.cfg.eval.buckets + 1).round().astype(int)
    buckets = [dict(start=int(a), end=int(b),
                    loss=float(nll_L[a:b].sum() / max(count_L[a:b].sum(), 1)))
               for a, b in zip(edges[:-1], edges[1:]) if b > a]
    return dict(loss=loss, perplexity=math.exp(min(loss, 700.0)),
                bits_per_token=loss / math.log(2), tokens=int(count_L.sum()), buckets=buckets)

  def predictions(self, tokens_BxL, prompt_len_B, policy):
    """[B, L-1] argmax predictions of the next token: teacher forcing (policy None) or the
    decode path under `policy` with decode.capacity slots (0: the whole example)."""
    if policy is None:
      return _fetch(self.programs.forward_predictions(self.state, self.put(tokens_BxL)))
    start = int(prompt_len_B.min()) - 1
    capacity = self.cfg.decode.capacity or tokens_BxL.shape[1]
    return _fetch(self.programs.decode_predictions(self.state, self.put(tokens_BxL), start,
                                                   capacity, policy))

  def tasks(self):
    """Exact-match accuracy (and the fraction of answer tokens right) per (task, length,
    depth) cell on held-out examples."""
    cfg, cells = self.cfg, []
    for task, length, depth in _cells(cfg):
      cell = dict(task=task, length=length, depth=depth)
      if not isinstance(self.tokenizer, ByteTokenizer):
        cells.append(dict(cell, accuracy=None, skipped='a byte-level task (data/synthetic.py); '
                          f'with {cfg.data.tokenizer} use ruler.tasks'))
        continue
      try:
        batch = synthetic.make_task_batch(task, cfg.eval.examples, length, depth, seed=cfg.seed,
                                          split='eval')
      except ValueError as e:                   # length too short for this task
        cells.append(dict(cell, accuracy=None, skipped=str(e)))
        continue
      tokens_BxL, mask_BxL = batch['tokens_BxL'], batch['answer_mask_BxL'][:, :-1]
      pred_BxL = self.predictions(tokens_BxL, batch['prompt_len_B'], self.policy)
      hit_BxL = pred_BxL == tokens_BxL[:, 1:]
      correct_B = (hit_BxL | ~mask_BxL).all(-1)
      cells.append(dict(cell, accuracy=float(correct_B.mean()), examples=len(correct_B),
                        token_accuracy=float((hit_BxL & mask_BxL).sum() / mask_BxL.sum())))
    return cells

  def cache(self):
    """Decode state after prefilling one held-out batch of seq_len tokens under the policy."""
    cfg = self.cfg
    prompt_BxP = self.eval_batches()[0][0][:, :cfg.data.seq_len]
    capacity = cfg.decode.capacity or cfg.data.seq_len
    layers = self.programs.prefill_state(self.state, self.put(prompt_BxP), capacity, self.policy)
    kv = [s for s in layers if registry.is_kv_cache(s)]
    tokens = [float(_fetch(s.size_BxK()).mean()) for s in kv]
    token_bytes = [s.token_bytes() for s in kv]
    other = [s for s in layers if not registry.is_kv_cache(s)]
    return dict(
        prompt_len=cfg.data.seq_len, capacity=capacity, policy=cfg.decode.policy,
        kv_layers=len(kv), tokens_per_layer=float(np.mean(tokens)) if kv else 0.0,
        tokens_by_layer=tokens,
        bytes_per_sequence=float(sum(t * b for t, b in zip(tokens, token_bytes))),
        capacity_bytes_per_sequence=int(sum(s.capacity * b for s, b in zip(kv, token_bytes))),
        other_state_bytes_per_sequence=int(sum(map(registry.nbytes, other)) // len(prompt_BxP)))

  def sample(self, prompt, seed=0):
    """A continuation of `prompt` (decode.generate with the decode config)."""
    d = self.cfg.decode
    prompt_1xP = jnp.asarray(self.tokenizer.encode(prompt, bos=True))[None]
    tokens, _ = decode.generate(nnx.merge(self.graphdef, self.state), prompt_1xP,
                                jax.random.key(seed), n_new=d.max_new_tokens,
                                capacity=d.capacity, temperature=d.temperature,
                                top_p=d.top_p, policy=self.policy,
                                prefill_chunk=d.prefill_chunk)
    return self.tokenizer.decode(np.asarray(tokens[0, prompt_1xP.shape[1]:]))


def _fetch(x):
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _cells(cfg):
  """(task, length, depth) cells; mqar has no depth (None)."""
  for task in cfg.eval.tasks:
    for length in cfg.eval.lengths:
      for depth in ((None,) if task == 'mqar' else cfg.eval.depths):
        yield task, int(length), depth


# --- Output ----------------------------------------------------------------------------------

def plot_tasks(cells, path, title=''):
  """Accuracy heatmap over (length x depth), one panel per task."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  tasks = list(dict.fromkeys(c['task'] for c in cells))
  cmap = plt.get_cmap('viridis').with_extremes(bad='lightgray')   # skipped cells
  fig, axes = plt.subplots(1, len(tasks), figsize=(3.5 * len(tasks), 3), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    mine = [c for c in cells if c['task'] == task]
    lengths = sorted({c['length'] for c in mine})
    depths = list(dict.fromkeys(c['depth'] for c in mine))
    acc_LxD = np.full((len(lengths), len(depths)), np.nan)
    for c in mine:
      if c['accuracy'] is not None:
        acc_LxD[lengths.index(c['length']), depths.index(c['depth'])] = c['accuracy']
    ax.imshow(acc_LxD, vmin=0, vmax=1, cmap=cmap, aspect='auto')
    for (i, j), a in np.ndenumerate(acc_LxD):
      ax.text(j, i, 'skipped' if np.isnan(a) else f'{a:.2f}', ha='center', va='center',
              color='white' if a < 0.5 else 'black')
    ax.set_xticks(range(len(depths)), ['-' if d is None else f'{d:g}' for d in depths])
    ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set(title=task, xlabel='depth', ylabel='length')
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def format_report(r):
  """The report as a readable text table."""
  l, c = r['loss'], r['kv_cache']
  lines = [f"step {r['step']} of {r['workdir']}  (mesh {r['mesh']}, decode policy "
           f"{r['decode_policy']}, {r['seconds']:.1f}s)",
           f"held-out loss{' (answer tokens)' * r['answer_loss']} {l['loss']:.4f} nats/token | "
           f"perplexity {l['perplexity']:.3f} | "
           f"{l['bits_per_token']:.3f} bits/token | {l['tokens']} tokens",
           'loss by position: ' + '  '.join(f"[{b['start']},{b['end']}) {b['loss']:.4f}"
                                             for b in l['buckets']),
           f"{'task':<10}{'length':>8}{'depth':>8}{'accuracy':>10}"]
  for cell in r['tasks']:
    depth = '-' if cell['depth'] is None else f"{cell['depth']:g}"
    acc = 'skipped' if cell['accuracy'] is None else f"{cell['accuracy']:.3f}"
    lines.append(f"{cell['task']:<10}{cell['length']:>8}{depth:>8}{acc:>10}")
  skipped = {(c['task'], c['length']): c['skipped'] for c in r['tasks'] if 'skipped' in c}
  lines += [f'  skipped {task} at length {n}: {why}' for (task, n), why in skipped.items()]
  lines.append(f"KV cache after a {c['prompt_len']}-token prefill: {c['tokens_per_layer']:.1f} "
               f"tokens/layer of {c['capacity']} slots ({c['kv_layers']} layers), "
               f"{c['bytes_per_sequence'] / 2**20:.3f} MiB/sequence "
               f"(capacity {c['capacity_bytes_per_sequence'] / 2**20:.3f} MiB)")
  if 'ruler' in r:
    lines.append(ruler_eval.format_summary(r['ruler']))
    lines += [f"  skipped {c['task']} at length {c['length']}: {c['skipped']}"
              for c in r['ruler'] if 'skipped' in c]
  if 'sample' in r:
    lines.append(f"sample: {r['sample']['prompt']!r} -> {r['sample']['continuation']!r}")
  return '\n'.join(lines)


# --- Everything ------------------------------------------------------------------------------

def load(workdir, *, step=None, config=None, overrides=None):
  """An Evaluator for a checkpoint of `workdir` (config: see training/run.py), its step."""
  run = load_run(workdir, step, config=config, overrides=overrides)
  return Evaluator(run), run.step


def run(workdir, *, step=None, config=None, overrides=None, output=None, sample=None):
  """Evaluates a checkpoint of `workdir`; writes OUTPUT/eval_step{N}.json and
  OUTPUT/tasks_step{N}.png (OUTPUT default workdir/eval). Returns the report dict.

  config / overrides: see training/run.py. Raises CheckpointError / ConfigError.
  """
  t0 = time.time()
  ev, step = load(workdir, step=step, config=config, overrides=overrides)
  cfg = ev.cfg
  report = dict(step=int(step), workdir=os.path.abspath(workdir), mesh=dict(ev.mesh.shape),
                data=dict(source=cfg.data.source, split=cfg.eval.split),
                decode_policy=cfg.decode.policy, answer_loss=cfg.data.loss == 'answer',
                task_path='teacher forcing' if ev.policy is None else 'decode',
                loss=ev.loss(), tasks=ev.tasks(), kv_cache=ev.cache())
  if cfg.ruler.tasks:
    report['ruler'] = ruler_eval.run_suite(ev)
    report['ruler_summary'] = ruler_eval.summary(report['ruler'])
  if sample is not None:
    report['sample'] = dict(prompt=sample, continuation=ev.sample(sample))
  report['seconds'] = time.time() - t0
  report['config'] = json.loads(cfg.to_json_best_effort())

  output = output or os.path.join(os.path.abspath(workdir), 'eval')
  report['json'] = os.path.join(output, f'eval_step{step}.json')
  if report['tasks']:                       # (eval.tasks=(): none, e.g. an hf: run)
    report['png'] = os.path.join(output, f'tasks_step{step}.png')
  if 'ruler' in report:
    report['ruler_png'] = os.path.join(output, f'ruler_step{step}.png')
  if jax.process_index() == 0:
    os.makedirs(output, exist_ok=True)
    with open(report['json'], 'w') as f:
      json.dump(report, f, indent=2)
    if 'png' in report:
      plot_tasks(report['tasks'], report['png'],
                 f"exact-match accuracy, step {step} ({report['task_path']}, policy "
                 f"{cfg.decode.policy})")
    if 'ruler' in report:
      ruler_eval.plot(report['ruler'], report['ruler_png'],
                      f'RULER score, step {step} (policy {cfg.decode.policy})')
  return report
