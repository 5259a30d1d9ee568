"""Thin entrypoints: one module per job (``python -m jobs.X`` for ``ray job submit``) and the ``pgseg`` command."""
