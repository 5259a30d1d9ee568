"""Text side: CLIP BPE tokenisation (open_clip's tokenizer), prompt templates, caption nouns."""
from .nouns import NounVocabulary, noun_prompts
from .prompts import IMAGENET_TEMPLATES, SEGMENTATION_TEMPLATES, fill_templates
from .tokenizer import tokenize

__all__ = ["IMAGENET_TEMPLATES", "NounVocabulary", "SEGMENTATION_TEMPLATES", "fill_templates", "noun_prompts", "tokenize"]
