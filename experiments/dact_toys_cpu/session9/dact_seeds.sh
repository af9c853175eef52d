#!/bin/bash
# Issue 8 fix 12, session 9: DACT cpu preset at commit of /work/wt9. Seed 0 alone on 2 cores
# (wall time), then seeds 1 and 2 side by side, one core and one CPU device each.
cd /work/wt9 && source /work/main/.venv/bin/activate && export PYTHONPATH=/work/wt9
R=/work/main/runs
/usr/bin/time -v python -m genrec_jax.main --config=configs/dact_toys.py:cpu --config.seed=0 \
  --workdir=$R/dact9_s0 > $R/dact9_s0.log 2>&1
for s in 1 2; do
  taskset -c $((s-1)) /usr/bin/time -v python -m genrec_jax.main --config=configs/dact_toys.py:cpu \
    --config.seed=$s --config.cpu_devices=1 --workdir=$R/dact9_s$s > $R/dact9_s$s.log 2>&1 &
done
wait
