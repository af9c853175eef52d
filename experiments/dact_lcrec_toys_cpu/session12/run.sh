#!/bin/bash
cd /work/main
export PYTHONPATH=/tmp/wt12b
START=$(date +%s)
/work/main/.venv/bin/python -m genrec_jax.main --config=/tmp/wt12b/configs/dact_lcrec_toys.py:cpu --workdir=runs/dact_lcrec_toys_cpu > runs/s12/lcrec_cpu.log 2>&1
echo "rc=$? wall=$(( $(date +%s) - START ))" >> runs/s12/lcrec_cpu.log
