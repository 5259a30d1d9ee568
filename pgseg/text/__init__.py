"""Text side: CLIP BPE tokenisation (open_clip's tokenizer), prompt templates, caption nouns."""
from .nouns import FILLER, NounVocabulary, noun_id, noun_prompt_ids, noun_prompts
from .prompts import IMAGENET_TEMPLATES, SEGMENTATION_TEMPLATES, fill_templates
from .tokenizer import tokenize

__all__ = ["IMAGENET_TEMPLATES", "FILLER", "NounVocabulary", "SEGMENTATION_TEMPLATES", "fill_templates", "noun_id",
           "noun_prompt_ids", "noun_prompts", "tokenize"]
