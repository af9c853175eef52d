#!/bin/bash
# SASRec 32-d learning-rate probe for the DACT cpu preset's period-0 CF model (issue 8 fix 12).
cd /work/main && source .venv/bin/activate
run() { core=$1; lr=$2
  taskset -c $core python -m genrec_jax.main --config=configs/sasrec_toys.py:cpu \
    --config.sasrec.hidden_dim=32 --config.sasrec.num_heads=1 --config.sasrec.epochs=12 \
    --config.sasrec.learning_rate=$lr --workdir=runs/sasrec32_lr$lr > runs/sasrec32_lr$lr.log 2>&1; }
run 0 1e-3 & run 1 5e-3 & wait
