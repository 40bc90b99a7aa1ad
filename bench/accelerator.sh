#!/usr/bin/env bash
# The side-by-side speed page on a GPU or TPU host, with what a user there runs: the small
# preset (width 512, 8 layers, bf16) and the platform's attention kernel (attention_impl=auto:
# cuDNN on a GPU, splash on a TPU). One process per kind, each under a time limit, so a kind
# that runs out of time or memory loses only its own rows; the page is
# bench/results/run_{gpu,tpu}.md (then `python -m bench.report` puts it in docs/side_by_side.md),
# and Titans' op counts bench/results/titans_ops_{gpu,tpu}.md (docs/titans.md).
#
#   bash bench/accelerator.sh [SECONDS_PER_KIND] [KINDS...]
#
# Defaults: 240 s per kind; kinds plain_wide plain titans_mac infini sliding. PLAN overrides
# the plan (bench/side_by_side/kinds.py), e.g. PLAN=train_tokens=131072,train_steps=5.
set -u
limit=${1:-240}; shift || true
kinds=${*:-plain_wide plain titans_mac infini sliding}
platform=$(${PYTHON:-python3} -c 'import jax; print(jax.default_backend())')
plan=${PLAN:-train_lengths=2048:8192,scale_lengths=32768,ratio_lengths=2048:32768,train_tokens=65536,train_steps=3,wide_length=2048}
status=0
for kind in $kinds; do
  timeout "$limit" ${PYTHON:-python3} -m bench.run --preset=small --dtype=bfloat16 --attention_impl=auto --sections=train \
      --kinds="$kind" --plan="$plan" --out="bench/results/run_$platform" \
      || { echo "bench/accelerator.sh: $kind stopped (exit $?)"; status=1; }
done
# Titans' XLA ops per layer-segment (kernel launches here) and the short-shape step
timeout "$limit" ${PYTHON:-python3} -m bench.titans_ops --out="titans_ops_$platform" \
    || { echo "bench/accelerator.sh: titans_ops stopped (exit $?)"; status=1; }
exit $status
