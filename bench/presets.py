"""Paper-size presets compiled on 8 forced CPU devices: per-device memory of the train step
(of decoding for the DECODE rows).

  python -m bench.presets [--only=NAME,..] [--out=presets]
  python -m bench.presets --render

Each row runs `python train.py --config=SPEC --workdir=W --compile_only --config.k=v ...`
(DECODE rows: --compile_decode) in
a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (the mesh a user would
pick on one 8-accelerator host, the attention backend that compiles on CPU: chunked, the
blockwise kernel that stands for cudnn / splash there) and records its compile.json:
parameters, per-device argument (parameters, optimizer state, batch) and temporary bytes.
A row fits when arguments + temporaries <= 80 GiB (an H100). Each row is recorded as soon as
it compiles; a rerun skips recorded rows unless --only names them.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from bench import provenance
from bench.common import ROOT, load_json, save_json

MEASURES = provenance.CORE + ('models', 'configs')
LIMIT_GIB = 80
# name -> (paper, config spec, overrides): the preset at its paper's size with the mesh,
# remat and microbatches chosen to fit.
PLAN = {
    'plain_1b_8k': ('1B Llama-style at 8K', 'configs/transformer.py:1b',
                    {'data.seq_len': 8192, 'train.batch_size': 128, 'train.microbatches': 16,
                     'mesh.fsdp': 8}),
    'titans_mac_340m': ('Titans MAC 340M, 4K (Table 5)', 'configs/titans_mac.py:340m',
                        {'train.microbatches': 16, 'mesh.fsdp': 8}),
    'titans_mac_760m': ('Titans MAC 760M, 4K (Table 5)', 'configs/titans_mac.py:760m',
                        {'train.microbatches': 16, 'mesh.fsdp': 8}),
    'infini_paper': ('Infini-attention LM, 32K in 2K segments', 'configs/infini.py:paper',
                     {'train.microbatches': 8, 'mesh.fsdp': 8}),
    'anchor_7b': ('AnSAN continued pretraining on a 7B Llama shape, 4K',
                  'configs/anchor_ep.py:small',
                  {'model.d_model': 4096, 'model.n_layers': 32, 'model.n_heads': 32,
                   'model.n_kv_heads': 32, 'model.mlp_dim': 11008, 'model.vocab_size': 32000,
                   'model.dtype': 'bfloat16', 'data.seq_len': 4096, 'train.batch_size': 64,
                   # fsdp 8 at 8 microbatches: 9.2 + 99.3 GiB (all 32 layers' weights gathered
                   # at once by the CPU compiler); tensor 8 shards them instead
                   'train.microbatches': 64, 'mesh.fsdp': 1, 'mesh.tensor': 8}),
    # NAMM (Sakana) on Llama 3 8B: a 32K prompt read in pieces of 512 (the paper's NAMM
    # update interval) with the cache compressed to a quarter, then 64 new tokens. Decoding,
    # not training: train.py --compile_decode.
    'namm_8b_32k': ('NAMM on a Llama 3 8B shape, 32K prompt decode', 'configs/namm.py:paper',
                    {'model.d_model': 4096, 'model.n_layers': 32, 'model.n_heads': 32,
                     'model.n_kv_heads': 8, 'model.mlp_dim': 14336, 'model.vocab_size': 128256,
                     'model.rope_theta': 500000.0, 'model.tie_embeddings': False,
                     'model.dtype': 'bfloat16', 'data.seq_len': 32768, 'train.batch_size': 4,
                     'decode.policy': 'namm', 'decode.compression_ratio': 0.75,
                     'decode.prefill_chunk': 512, 'decode.max_new_tokens': 64,
                     'mesh.tensor': 8}),
}
DECODE = ('namm_8b_32k',)          # rows compiled as decoding (train.py --compile_decode)


def compile_row(spec, overrides, flag='--compile_only'):
  """compile.json of one `flag` run of train.py on 8 forced CPU devices, and its seconds."""
  sets = {'mesh.data': 1, 'mesh.fsdp': 1, 'mesh.tensor': 1, 'model.attention_impl': 'chunked',
          **overrides}
  with tempfile.TemporaryDirectory() as work:
    cmd = [sys.executable, 'train.py', f'--config={spec}', f'--workdir={work}',
           flag] + [f'--config.{k}={v}' for k, v in sets.items()]
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
           'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
      return dict(error=proc.stderr.strip().splitlines()[-1][:300], seconds=time.time() - t0,
                  command=' '.join(cmd[1:]).replace(work, 'W'))
    with open(os.path.join(work, 'compile.json')) as f:
      report = json.load(f)
  report.update(seconds=round(time.time() - t0, 1),
                command='python ' + ' '.join(cmd[1:]).replace(work, 'W'))
  return report


def render(results):
  gib = lambda b: b / 2**30
  lines = ['## Paper-size presets: per-device memory of the train step (or decoding)', '',
           'Each preset compiled (`--compile_only`, abstract shapes: nothing allocated) on 8 '
           'forced CPU devices with the chunked attention kernel; per-device bytes from '
           'XLA\'s memory analysis of the compiled step. Fits: arguments + temporaries <= '
           f'{LIMIT_GIB} GiB (an H100). Produced by `python -m bench.presets`.', '',
           '| preset | paper size | parameters | mesh | microbatches | arguments GiB | '
           'temporaries GiB | fits |', '|---|---|---|---|---|---|---|---|']
  for name, r in results['rows'].items():
    if 'error' in r:
      lines.append(f'| {name} | {r["paper"]} | — | — | — | — | — | failed: {r["error"]} |')
      continue
    b = r['per_device_bytes']
    total = gib(b['arguments'] + b['temp'])
    mesh = ' x '.join(f'{k} {v}' for k, v in r['mesh'].items() if v > 1) or '1 device'
    how = (f'decode: batch {r["batch"]}, cache {r["capacity"]:,} slots'
           if r.get('program') == 'decode' else r['microbatches'])
    lines.append(f'| {name} | {r["paper"]} | {r["params"] / 1e9:.2f}B | {mesh} | '
                 f'{how} | {gib(b["arguments"]):.1f} | {gib(b["temp"]):.1f} | '
                 f'{"yes" if total <= LIMIT_GIB else "no"} ({total:.0f} GiB) |')
  missing = [name for name in PLAN if name not in results['rows']]
  lines += ['', (f'Not compiled yet: {", ".join(missing)}. ' if missing else '')
            + 'Decode rows (`train.py --compile_decode`) compile evaluate.py\'s decoding: the '
            'prompt read in decode.prefill_chunk pieces under the policy, then the new tokens; '
            'their cache holds the kept tokens, one piece and the new tokens. The CPU compiler '
            'gathers every layer\'s FSDP weights at once (no latency-hiding scheduler), so a '
            'GPU compile may report less.', '',
            'Commands (W: a temporary workdir):', '']
  lines += [f'    {r["command"]}' for r in results['rows'].values()]
  return '\n'.join(lines) + '\n'


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--only', default='', help='rows to (re)compile; default: the missing ones')
  ap.add_argument('--out', default='presets')
  ap.add_argument('--render', action='store_true')
  args = ap.parse_args(argv)
  prefix = os.path.join(ROOT, 'bench', 'results', args.out)
  results = load_json(prefix + '.json', {'rows': {}})
  only = set(filter(None, args.only.split(',')))
  for name, (paper, spec, overrides) in ({} if args.render else PLAN).items():
    if (only and name not in only) or (not only and name in results['rows']):
      continue
    row = compile_row(spec, overrides,
                      '--compile_decode' if name in DECODE else '--compile_only')
    row.update(paper=paper, microbatches=overrides.get('train.microbatches', 1),
               provenance=provenance.record(MEASURES, 0, row.get('command')))
    results['rows'][name] = row
    save_json(prefix + '.json', results)
    print(name, json.dumps({k: row.get(k) for k in ('per_device_bytes', 'error', 'seconds')}),
          flush=True)
  with open(prefix + '.md', 'w') as f:
    f.write(render(results))


if __name__ == '__main__':
  main()
