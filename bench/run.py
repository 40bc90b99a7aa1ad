"""The results page in one command: speed, memory, decode and capability of every model kind.

  python -m bench.run --quick --jobs=2   # ~15 min on 2 CPU cores (small lengths, few steps):
                                         # bench/results/run_quick.md
  python -m bench.run --jobs=2      # the full page, ~40 min (2K..64K training, 1M-token streams):
                                    # bench/results/run.md
  python -m bench.run --kinds=plain,titans_mac --sections=train,stream   # a part of it
  bash bench/accelerator.sh         # on a GPU / TPU host: width 512, 8 layers, bf16, the
                                    # platform's attention kernel: bench/results/run_gpu.md
  python -m bench.report            # then regenerate docs/ from bench/results/

Sections (each a function in bench/side_by_side/; all numbers come from running the same
jitted code as train.py / evaluate.py on this machine, nothing is typed in):
  train       training tokens/s, MFU against the matmul peak measured in this run, XLA memory,
              per kind and context length, and the ratio to the plain transformer; a width-512
              plain model for the MFU target.
  ratio       the speed targets' ratios head to head: the kind's and plain's train steps
              alternated for a few rounds (the table's cells are single steps minutes apart).
  stream      inference over long inputs, chunk by chunk with the decode state carried: time
              per token, state bytes and one decode step at each total length; fitted exponents
              (the constant-memory kinds must show ~0).
  decode      per eviction policy on the plain model: decode tokens/s and KV-cache bytes vs
              generated length (and on AnSAN with its anchor policy).
  capability  every kind trained the same number of steps on the corpus mixed with synthetic
              long-context tasks, then held-out loss by position bucket and passkey / S-NIAH /
              MQAR exact match on a (length x depth) grid with held-out seeds; the plain model
              also under each eviction policy at half the cache. Not run by default: at the
              default 300 steps no kind learns the tasks (the page then shows the loss only);
              ask for it with --sections=capability --plan=cap_steps=N.
  profile     where the speed target missed by most was measured (else the memory kind slowest
              relative to plain): XLA ops per step under the profiler, parts timed alone, and
              the kind's and plain's steps on one core vs all cores.
Writes OUT.md (the page, with the command, machine, versions, seeds and the targets met or
missed by how much; the targets are bench/targets.json), OUT.json and OUT_*.png.
"""
import dataclasses
import os
import sys
import tempfile
import time

from absl import app, flags

from bench import provenance
from bench.common import ROOT, log, machine
from bench.side_by_side.capability import capability_section
from bench.side_by_side.decoding import decode_section
from bench.side_by_side.jobs import run_jobs, save, share_sections
from bench.side_by_side.kinds import ALL_KINDS, KINDS, Setup, make_plan, model_shape
from bench.side_by_side.profile import profile_section, worst_gap
from bench.side_by_side.throughput import ratio_section, stream_section, train_section
from training import flops

MEASURES = ('models',) + provenance.CORE       # every kind's code, and what trains it

_QUICK = flags.DEFINE_bool('quick', False, 'Small lengths and few steps (~30 min on one CPU core, '
                           '~15 with --jobs=2 on two).')
_KINDS = flags.DEFINE_list('kinds', None, 'Model kinds (default: all of KINDS, and plain_wide, '
                           'the MFU row of the train section). Rows of other kinds stay as an '
                           'earlier run of the same sections wrote them.')
_SECTIONS = flags.DEFINE_list('sections', ['train', 'ratio', 'stream', 'decode', 'profile'],
                              'Sections to run (capability on request: at the default budget '
                              'no kind learns the tasks); the others stay as an earlier run '
                              'wrote them (empty: only re-render the page).')
_OUT = flags.DEFINE_string('out', '', 'Output path prefix (default bench/results/run, with '
                           '--quick bench/results/run_quick: a quick run never replaces the '
                           'full page).')
_WORKDIR = flags.DEFINE_string('workdir', '', 'Where capability runs train (default: a temp dir).')
_NAMM_RUN = flags.DEFINE_string('namm_run', '', 'evolve.py workdir for the NAMM policy (default: '
                                'a random parameter vector drawn like a CMA-ES population member).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of model init, data order and task examples.')
_PRESET = flags.DEFINE_string('preset', 'tiny', "Every kind's config preset (tiny: this CPU; "
                              'small: width 512, 8 layers, for a GPU/TPU). The MFU row stays '
                              'transformer.py:small.')
_ATTENTION = flags.DEFINE_string('attention_impl', '', "Attention kernel of plain, ansan and the "
                                 "MFU row ('': chunked, this CPU's fastest; auto on a GPU or TPU "
                                 'host: cudnn / splash at bf16, as bench/accelerator.sh runs).')
_DTYPE = flags.DEFINE_string('dtype', '', "Every kind's model.dtype ('': the preset's; "
                             'bfloat16 on a GPU or TPU host).')
_PLAN = flags.DEFINE_list('plan', [], 'Plan fields to change, FIELD=VALUE (tuples as 2048:8192), '
                          'e.g. cap_steps=3000,train_tokens=131072; a page of another plan or '
                          'preset starts afresh (see --out).')
_JOBS = flags.DEFINE_integer('jobs', 1, 'Run the sections in this many processes side by side, '
                             'each pinned to its share of the CPU cores (2 on a 2-core '
                             'machine: train, ratio, profile in one, the rest in the other; '
                             'the speed sections then time one core).')


def main(argv):
  """Runs the --sections (in --jobs processes) and writes the page; the flags are read here
  only."""
  del argv
  t0 = time.time()
  plan = make_plan(_QUICK.value, _PLAN.value)
  setup = Setup(preset=_PRESET.value, seed=_SEED.value, namm_run=_NAMM_RUN.value,
                attention_impl=_ATTENTION.value, dtype=_DTYPE.value)
  kinds = _KINDS.value or list(ALL_KINDS)
  for k in kinds:
    if k not in ALL_KINDS:
      raise SystemExit(f'--kinds: unknown kind {k!r}; one of {sorted(KINDS) + ["plain_wide"]}')
  prefix = os.path.join(ROOT, _OUT.value or 'bench/results/run' + '_quick' * _QUICK.value)
  res = dict(quick=_QUICK.value, preset=setup.preset, attention_impl=setup.attention_impl, plan=dataclasses.asdict(plan),
             models={k: model_shape(setup.config(k)) for k in kinds if k in KINDS},
             machine=machine(),
             seed=setup.seed, commands={}, kinds=kinds)
  if _JOBS.value > 1 and len(_SECTIONS.value) > 1:
    run_jobs(share_sections(_SECTIONS.value, _JOBS.value), sys.argv[1:])
    save(prefix, res, [], plan, setup)        # the page of everything the jobs wrote
    log(f'wrote {prefix}.md/.json/_*.png in {(time.time() - t0) / 60:.1f} min '
        f'({_JOBS.value} jobs)')
    return
  peak = flops.measure_peak_flops()
  command = ' '.join(['python -m bench.run'] + sys.argv[1:])
  log(f"{res['machine']}; matmul peak {peak / 1e9:.1f} GFLOP/s")
  sections = _SECTIONS.value
  os.makedirs(os.path.dirname(prefix), exist_ok=True)
  workdir = lambda: _WORKDIR.value or tempfile.mkdtemp(prefix='mnemax-bench-')
  done = []
  partial = lambda rows: save(prefix, dict(res, train=rows), done + ['train'], plan, setup)
  for name, run in (('train', lambda: {'train': train_section(kinds, plan, peak, setup,
                                                               partial)}),
                    ('ratio', lambda: {'ratio': ratio_section(kinds, plan, setup)}),
                    ('stream', lambda: dict(zip(('stream', 'stream_fits'),
                                                stream_section(kinds, plan, setup)))),
                    ('decode', lambda: {'decode': decode_section(kinds, plan, setup)}),
                    ('capability', lambda: {'capability': capability_section(
                        kinds, plan, setup, workdir())}),
                    ('profile', lambda: {'profile': profile_section(
                        *worst_gap(res, prefix + '.json', plan), plan, setup)})):
    if name in sections:     # (set here: a save() before lists the earlier run's command)
      res['commands'][name] = dict(command=command, peak=peak, kinds=kinds,
                                   started=time.strftime('%Y-%m-%d %H:%M'),
                                   cores=len(os.sched_getaffinity(0)),
                                   provenance=provenance.record(MEASURES, setup.seed, command))
      res.update(run())
      res['commands'][name]['minutes'] = (time.time() - t0) / 60
      done.append(name)
      res = save(prefix, res, done, plan, setup)   # after every section: a crash loses only one
  if not done:                                 # --sections= : only re-render the page
    save(prefix, res, done, plan, setup)
  log(f'wrote {prefix}.md/.json/_*.png in {(time.time() - t0) / 60:.1f} min')


if __name__ == '__main__':
  app.run(main)
