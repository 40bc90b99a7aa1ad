"""Export a checkpoint to a Hugging Face Llama directory (config.json + safetensors).

  python export_hf.py --workdir=W --out=DIR [--step=N] [--dtype=bfloat16]

The result loads with transformers' LlamaForCausalLM.from_pretrained(DIR). Models whose
mixers add parameters Llama has no place for (memory gates, ...) are refused, naming them.
"""
from absl import flags, logging

from training import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (or its checkpoints/ folder).')
_OUT = flags.DEFINE_string('out', None, 'Output directory.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16', 'float16'],
                           'Tensor dtype in the safetensors files.')
flags.mark_flags_as_required(['workdir', 'out'])


def main(argv):
  del argv
  from training.hf_export import export_checkpoint
  try:
    step = export_checkpoint(_WORKDIR.value, _OUT.value, step=_STEP.value, dtype=_DTYPE.value)
  except ValueError as e:              # a mixer whose parameters Llama has no place for
    raise SystemExit(f'error: {e}') from None
  print(f'wrote step {step} of {_WORKDIR.value} to {_OUT.value}')


if __name__ == '__main__':
  logging.set_verbosity(logging.ERROR)
  cli.run(main)
