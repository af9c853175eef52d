#!/bin/bash
# UniGRec cpu-preset ablations, seed 0, one after the other, from the worktree at 39418cb
cd /work/wt_uni2
export PYTHONPATH=/work/wt_uni2
PY=/work/main/.venv/bin/python
U="$PY -m genrec_jax.main --config=configs/unigrec_toys.py:cpu"
run() { name=$1; shift; { time $U --workdir=/work/main/runs/unigrec_$name "$@" ; } > /work/main/runs/unigrec_$name.log 2>&1; }
run no_anneal --config.tokenizer.temperature_end=0.01
run no_uniformity --config.tokenizer.uniformity_weight=0
run no_token_kl --config.unigrec.token_weight=0
run no_repr_nce --config.unigrec.representation_weight=0
run joint_anneal --config.unigrec.joint_temperature_end=0.0001
