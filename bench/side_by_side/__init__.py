"""The side-by-side benchmark of every model kind (the CLI is bench/run.py).

  kinds       the kinds, their configs (Setup), the run's Plan (FULL / QUICK)
  throughput  sections train, ratio, stream
  decoding    section decode
  capability  section capability
  profile     section profile, and where it goes (worst_gap)
  targets     the issue's targets (bench/targets.json) checked against the rows
  page, plots the markdown page and its plots, from the result dict alone
  jobs        sections shared out between processes; the locked merge and save
"""
