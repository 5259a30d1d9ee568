"""Thin entrypoints: one module per job (``python -m jobs.X`` for ``ray job submit``) and the ``pgseg`` command."""
import os as _os

# img2dataset imports albumentations, which asks the internet for updates on import unless told not to
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
