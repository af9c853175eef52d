"""Parts of the GRM speed benchmark (`tools/bench_grm.py`), one concern per module."""
