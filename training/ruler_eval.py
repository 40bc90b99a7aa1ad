"""The RULER suite (data/ruler.py) through the decode path: evaluate.py's `ruler` section.

Per (task, length, depth) cell, `ruler.examples` held-out examples (seeds from HELD_OUT) are
tokenized by the run's tokenizer, read by `decode.prefill` under the run's decode policy and
capacity (every mixer's recurrent state carried), then continued greedily for the task's
tokens to generate, as RULER does. The score is RULER's string_match_all, x 100, averaged
over the examples; the summary averages a task's depths per length, then tasks.
"""
import jax
import numpy as np
from flax import nnx

from data import ruler
from data.ruler import HELD_OUT, filler_id
from models import decode

PARAMS = ('num_needle_k', 'num_needle_v', 'num_needle_q', 'num_hops', 'num_chains')


def task_params(cfg, task):
  """The `ruler.*` parameter overrides (nonzero keys) that apply to `task`."""
  own = ruler.TASKS[task]
  return {k: int(cfg.ruler[k]) for k in PARAMS if cfg.ruler[k] and k in own}


def cell_examples(cfg, tokenizer, task, length, depth):
  """The cell's examples, or the reason it is skipped (too short for the task)."""
  r = cfg.ruler
  try:
    return [ruler.example(task, length, tokenizer, HELD_OUT + i, depth,
                          r.max_new_tokens or None, **task_params(cfg, task))
            for i in range(r.examples)], None
  except ValueError as e:
    return None, str(e)


def left_pad(examples, filler_id):
  """[B, P] prompts of one length: BOS, then `filler_id` (a newline) repeated, then each
  example's text: one compiled program per cell."""
  P = max(len(e.prompt_ids) for e in examples)
  return np.stack([np.concatenate([e.prompt_ids[:1], np.full(P - len(e.prompt_ids), filler_id,
                                                              np.int32), e.prompt_ids[1:]])
                   for e in examples])


def make_generate(graphdef, policy, prefill_chunk):
  """Jitted greedy decode.generate(state, prompt_BxP, n_new, capacity) -> [B, P + n_new]."""
  return jax.jit(
      lambda state, prompt_BxP, n_new, capacity: decode.generate(
          nnx.merge(graphdef, state), prompt_BxP, jax.random.key(0), n_new=n_new,
          capacity=capacity, policy=policy, prefill_chunk=prefill_chunk)[0],
      static_argnums=(2, 3))


def run_suite(ev):
  """[cell] for the config's ruler tasks x lengths x depths (Evaluator `ev`)."""
  cfg, tok = ev.cfg, ev.tokenizer
  filler = filler_id(tok)
  generate = make_generate(ev.graphdef, ev.policy, cfg.decode.prefill_chunk)
  ratio = cfg.decode.compression_ratio and cfg.decode.policy != 'none'
  cells = []
  for task in cfg.ruler.tasks:
    for length in cfg.ruler.lengths:
      for depth in (cfg.ruler.depths or (None,)):
        cell = dict(task=task, length=int(length), depth=depth)
        examples, skipped = cell_examples(cfg, tok, task, int(length), depth)
        if skipped:
          cells.append(dict(cell, score=None, skipped=skipped))
          continue
        new = examples[0].max_new_tokens
        if filler is not None:
          prompts = [left_pad(examples, filler)]
        else:                                  # no one-token filler: one example at a time
          prompts = [e.prompt_ids[None] for e in examples]
        if ratio:                              # the budget: a ratio of this cell's prompts
          generate = make_generate(ev.graphdef, ev.policy_for(prompts[0].shape[1]),
                                   cfg.decode.prefill_chunk)
        outs = [np.asarray(generate(ev.state, ev.put(p), new, cfg.decode.capacity))
                for p in prompts]
        texts = [_answer(tok, row[-new:]) for out in outs for row in out]
        scores = [100 * ruler.score(t, e.references) for t, e in zip(texts, examples)]
        cells.append(dict(cell, score=float(np.mean(scores)), examples=len(examples),
                          prompt_tokens=int(max(len(e.prompt_ids) for e in examples)),
                          first=dict(prediction=texts[0], references=examples[0].references)))
  return cells


def _answer(tokenizer, new_ids):
  """The generated text up to the first EOS."""
  ends = np.flatnonzero(new_ids == tokenizer.EOS)
  return tokenizer.decode(new_ids[:ends[0]] if len(ends) else new_ids)


def summary(cells):
  """{task: {length: mean score over depths}}, and 'average' over tasks per length."""
  out = {}
  for c in cells:
    if c['score'] is not None:
      out.setdefault(c['task'], {}).setdefault(c['length'], []).append(c['score'])
  out = {t: {n: float(np.mean(s)) for n, s in by.items()} for t, by in out.items()}
  lengths = sorted({n for by in out.values() for n in by})
  out['average'] = {n: float(np.mean([by[n] for by in out.values() if n in by]))
                    for n in lengths}
  return out


def format_summary(cells):
  """RULER's table: a row per task, a column per length (score x 100)."""
  s = summary(cells)
  lengths = s.pop('average') if 'average' in s else {}
  head = f"{'RULER task':<18}" + ''.join(f'{n:>9}' for n in lengths)
  rows = [f'{t:<18}' + ''.join(f"{by.get(n, float('nan')):>9.1f}" for n in lengths)
          for t, by in s.items()]
  return '\n'.join([head] + rows + [f"{'average':<18}" + ''.join(
      f'{v:>9.1f}' for v in lengths.values())])


def plot(cells, path, title=''):
  """Heatmap: task x length, score (mean over depths)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  s = summary(cells)
  s.pop('average', None)
  tasks = list(s)
  lengths = sorted({n for by in s.values() for n in by})
  if not tasks:                                    # every cell skipped: nothing to draw
    return
  score_TxL = np.array([[s[t].get(n, np.nan) for n in lengths] for t in tasks])
  fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 3, 0.45 * len(tasks) + 1.5))
  ax.imshow(score_TxL, vmin=0, vmax=100, cmap='viridis', aspect='auto')
  for (i, j), v in np.ndenumerate(score_TxL):
    ax.text(j, i, '-' if np.isnan(v) else f'{v:.0f}', ha='center', va='center',
            color='white' if np.isnan(v) or v < 50 else 'black')
  ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
  ax.set_yticks(range(len(tasks)), tasks)
  ax.set(xlabel='length (tokens)', title=title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
