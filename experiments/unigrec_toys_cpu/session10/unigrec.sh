#!/bin/bash
# UniGRec cpu preset, seed 0, from the worktree at a fixed commit
cd /work/wt_uni
export PYTHONPATH=/work/wt_uni
PY=/work/main/.venv/bin/python
{ time $PY -m genrec_jax.main --config=configs/unigrec_toys.py:cpu --workdir=/work/main/runs/unigrec_cpu_s0 ; } > /work/main/runs/unigrec_cpu_s0.log 2>&1
