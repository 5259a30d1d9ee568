"""The distributed stages on Ray (data, training, evaluation, sweeps, tracking). Builds on ``pgseg``."""
