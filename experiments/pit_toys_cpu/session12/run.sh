#!/bin/bash
cd /work/main
export PYTHONPATH=/tmp/wt12
START=$(date +%s)
/work/main/.venv/bin/python -m genrec_jax.main --config=/tmp/wt12/configs/dact_toys.py:cpu --workdir=runs/dact_pit_toys_cpu --config.continual.methods="('ft_grm','dact','pit')" > runs/s12/pit_continual.log 2>&1
echo "rc=$? wall=$(( $(date +%s) - START ))" >> runs/s12/pit_continual.log
