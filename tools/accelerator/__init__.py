"""The accelerator suite: a bundle built here (prepare.py), the runs made there (run.py)."""
