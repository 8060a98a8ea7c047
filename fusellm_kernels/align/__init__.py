"""Alignment between tokenizers (pure CPU, no Triton): tokenizer conventions, exact MinED
token alignment, vocabulary maps and per-document position maps."""
from fusellm_kernels.align.conventions import (
    ConventionError,
    TokenizerConventions,
    detect_conventions,
    token_bytes,
    token_text,
)
from fusellm_kernels.align.min_ed import dtw_mappings, min_ed_alignment
from fusellm_kernels.align.position_map import PositionMap, position_map
from fusellm_kernels.align.vocab_map import replace_marker, soft_lookup, vocab_list, vocab_map

__all__ = [
    "ConventionError",
    "PositionMap",
    "TokenizerConventions",
    "detect_conventions",
    "dtw_mappings",
    "min_ed_alignment",
    "position_map",
    "replace_marker",
    "soft_lookup",
    "token_bytes",
    "token_text",
    "vocab_list",
    "vocab_map",
]
