"""matplotlib for files only (the Agg backend), imported when a picture is drawn: the processes that never draw one
(training workers, Tune trainables) do not pay for it."""
from __future__ import annotations

from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
