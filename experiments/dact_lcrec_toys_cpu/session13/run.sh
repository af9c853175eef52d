#!/bin/bash
cd /work/main
export PYTHONPATH=/work/wt13
START=$(date +%s)
/work/main/.venv/bin/python -m genrec_jax.main --config=/work/wt13/configs/dact_lcrec_toys.py:cpu --workdir=runs/dact_lcrec_toys_cpu_s13b > runs/s13/lcrec_cpu_b.log 2>&1
echo "rc=$? wall=$(( $(date +%s) - START ))" >> runs/s13/lcrec_cpu_b.log
