"""The PGSeg model: image encoder with PG units, text encoder with T-NPR, projectors, NPR supervision."""
from .pgseg import ImageEmbedding, PGSeg, TextEmbedding, TrainOutput

__all__ = ["ImageEmbedding", "PGSeg", "TextEmbedding", "TrainOutput"]
