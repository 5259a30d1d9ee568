"""CLIP BPE tokenisation, from open_clip: ftfy, double HTML-unescape, whitespace collapse, lower-case; SOT, ids,
EOT, zero padding; too-long input truncated with its last token set to EOT (what the released wrapper does)."""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch
from open_clip.tokenizer import SimpleTokenizer

SOT_TOKEN = 49406
EOT_TOKEN = 49407


@lru_cache(maxsize=8)
def _tokenizer(context_length: int) -> SimpleTokenizer:
    return SimpleTokenizer(context_length=context_length)


def tokenize(texts: str | Sequence[str], context_length: int = 77) -> torch.Tensor:
    """``texts`` → [N, context_length] int64 token ids."""
    if isinstance(texts, str):
        texts = [texts]
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("tokenize: every text must be a string")
    return _tokenizer(context_length)(list(texts), context_length=context_length)
