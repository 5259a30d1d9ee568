"""Nouns of a caption without a tagger: caption words matched against a noun vocabulary (NLTK's tagger data
cannot be downloaded here). Used by GroupViT's optional multi-label loss (K noun prompts per caption)."""
from __future__ import annotations

import random
import re
import zlib
from pathlib import Path
from typing import Iterable, Sequence

_WORD = re.compile(r"[a-z]+")
BUILTIN_VOCABULARY = Path(__file__).with_name("nouns.txt")


def _singular(word: str) -> list[str]:
    """Candidate singular forms of ``word`` (itself first)."""
    out = [word]
    if word.endswith("ies") and len(word) > 4:
        out.append(word[:-3] + "y")
    if word.endswith("es") and len(word) > 3:
        out.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss") and len(word) > 2:
        out.append(word[:-1])
    return out


class NounVocabulary:
    """A set of nouns; :meth:`nouns_in` returns the vocabulary nouns of a caption, in order, without repeats."""

    def __init__(self, nouns: Iterable[str]):
        self.nouns = {n.strip().lower() for n in nouns if n.strip() and not n.startswith("#")}
        if not self.nouns:
            raise ValueError("the noun vocabulary is empty")

    @classmethod
    def from_file(cls, path: str | Path | None = None) -> "NounVocabulary":
        path = Path(path) if path is not None else BUILTIN_VOCABULARY
        if not path.is_file():
            raise FileNotFoundError(f"noun vocabulary {path}: no such file")
        return cls(path.read_text(encoding="utf-8").splitlines())

    def nouns_in(self, caption: str) -> list[str]:
        found: list[str] = []
        for word in _WORD.findall(caption.lower()):
            noun = next((w for w in _singular(word) if w in self.nouns), None)
            if noun is not None and noun not in found:
                found.append(noun)
        return found


FILLER = -1  # the noun id of a prompt that is the caption itself (a caption with fewer than K nouns)


def noun_id(noun: str) -> int:
    """A noun's id, the same in every process (CRC-32 of the word): prompts of one noun in different captions and
    templates share it."""
    return zlib.crc32(noun.encode("utf-8")) & 0x7FFFFFFF


def noun_prompts(caption: str, vocabulary: NounVocabulary, k: int, templates: Sequence[str],
                 rng: random.Random) -> list[str]:
    """K prompts for a caption: up to K of its nouns (a random choice) in random templates; when it has fewer
    than K nouns, the caption itself fills the remaining places."""
    return [prompt for prompt, _ in noun_prompt_ids(caption, vocabulary, k, templates, rng)]


def noun_prompt_ids(caption: str, vocabulary: NounVocabulary, k: int, templates: Sequence[str],
                    rng: random.Random) -> list[tuple[str, int]]:
    """The K prompts of :func:`noun_prompts` with each one's noun id (``FILLER`` for the caption itself)."""
    nouns = vocabulary.nouns_in(caption)
    chosen = rng.sample(nouns, min(k, len(nouns)))
    prompts = [(rng.choice(templates).format(n), noun_id(n)) for n in chosen]
    return prompts + [(caption, FILLER)] * (k - len(prompts))
