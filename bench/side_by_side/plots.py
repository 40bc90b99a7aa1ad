"""The side-by-side page's plots, from a run's result dict alone."""
import numpy as np


def plots(res, prefix):
  """Writes prefix_{train,stream,decode,capability}.png, each where res has its section."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  rows = [r for r in res.get('train', []) if 'tokens_per_s' in r and r['kind'] != 'plain_wide']
  if rows:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for kind in dict.fromkeys(r['kind'] for r in rows):
      rs = [r for r in rows if r['kind'] == kind]
      axes[0].plot([r['length'] for r in rs], [r['tokens_per_s'] for r in rs], 'o-', label=kind)
      axes[1].plot([r['length'] for r in rs], [r['memory_mib'] for r in rs], 'o-', label=kind)
    for ax, title in zip(axes, ('training tokens/s', 'XLA memory per step (MiB)')):
      ax.set(xscale='log', yscale='log', xlabel='context length', title=title)
      ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(prefix + '_train.png', dpi=90)
  rows = [r for r in res.get('stream', []) if 'state_bytes' in r]
  if rows:
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for kind in dict.fromkeys(r['kind'] for r in rows):
      rs = [r for r in rows if r['kind'] == kind]
      xs = [r['tokens'] for r in rs]
      for ax, key in zip(axes, ('us_per_token', 'state_bytes', 'decode_step_ms')):
        ax.plot(xs, [r[key] for r in rs], 'o-', label=kind)
    for ax, title in zip(axes, ('us per token (reading)', 'decode state bytes',
                                'one decode step (ms)')):
      ax.set(xscale='log', yscale='log', xlabel='tokens read', title=title)
      ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(prefix + '_stream.png', dpi=90)
  rows = res.get('decode', [])
  if rows:
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
      ax.plot(np.arange(1, len(r['kv_bytes']) + 1), np.asarray(r['kv_bytes']) / 2**10,
              label=f"{r['kind']}/{r['policy']} ({r['tokens_per_s']:.0f} tok/s)")
    ax.set(xlabel='generated tokens', ylabel='KV cache (KiB per sequence)',
           title='KV cache while decoding')
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(prefix + '_decode.png', dpi=90)
  rows = [r for r in res.get('capability', []) if r['loss']]
  if rows:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for r in rows:
      b = r['loss']['buckets']
      axes[0].plot([(x['start'] + x['end']) / 2 for x in b], [x['loss'] for x in b], 'o-',
                   label=r['kind'])
    axes[0].set(xlabel='position', ylabel='held-out loss (nats/byte)', title='loss by position')
    axes[0].legend(fontsize=7)
    allrows = res['capability']
    tasks = list(dict.fromkeys(c['task'] for c in allrows[0]['tasks']))
    width = 0.8 / len(tasks)
    for i, task in enumerate(tasks):
      acc = [np.mean([c['accuracy'] for c in r['tasks'] if c['task'] == task
                      and c['accuracy'] is not None] or [np.nan]) for r in allrows]
      axes[1].bar(np.arange(len(allrows)) + i * width, acc, width, label=task)
    axes[1].set_xticks(np.arange(len(allrows)) + 0.4 - width / 2,
                       [f"{r['kind']}/{r['policy']}" for r in allrows], rotation=60, fontsize=7)
    axes[1].set(ylim=(0, 1), title='task exact match (mean over grid)')
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(prefix + '_capability.png', dpi=90)
  plt.close('all')
