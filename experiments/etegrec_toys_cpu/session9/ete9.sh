#!/bin/bash
# Issue 10, session 9: ETEGRec w/o end to end, then the official SIA sign; code at cc61a29.
cd /work/wt9b && source /work/main/.venv/bin/activate && export PYTHONPATH=/work/wt9b
E="python -m genrec_jax.main --config=configs/etegrec_toys.py:cpu --config.cpu_devices=1"
R=/work/main/runs
$E --config.etegrec.end_to_end=False --workdir=$R/etegrec9_no_ete > $R/etegrec9_no_ete.log 2>&1
$E --config.etegrec.sia_logit_sign=code --workdir=$R/etegrec9_sign_code > $R/etegrec9_sign_code.log 2>&1
