#!/bin/bash
# Issue 8 fix 12: the re-budgeted DACT cpu preset, seed 0 alone on 2 cores (wall time), then
# seeds 1 and 2 side by side, one core each.
cd /work/main && source .venv/bin/activate
/usr/bin/time -v python -m genrec_jax.main --config=configs/dact_toys.py:cpu --config.seed=0 \
  --workdir=runs/dact_cpu_s0 > runs/dact_cpu_s0.log 2>&1
for s in 1 2; do
  taskset -c $((s-1)) /usr/bin/time -v python -m genrec_jax.main --config=configs/dact_toys.py:cpu \
    --config.seed=$s --workdir=runs/dact_cpu_s$s > runs/dact_cpu_s$s.log 2>&1 &
done
wait
