"""Alignment between tokenizers (pure CPU, no Triton): tokenizer conventions, exact MinED
token alignment, vocabulary maps and per-document position maps.

    src, tgt = detect_conventions(source_tokenizer), detect_conventions(target_tokenizer)
    vmap = vocab_map(source_tokenizer.get_vocab(), target_tokenizer.get_vocab(),
                     source_marker=src.marker, target_marker=tgt.marker, kind="soft",
                     source_logits_size=source_model.config.vocab_size)       # once per source
    lookup = soft_lookup(vmap, source_tokenizer.get_vocab(), target_tokenizer.get_vocab(),
                         source_marker=src.marker, target_marker=tgt.marker)
    pm = position_map(source_tokens, target_tokens, target_ids,                  # per document
                      source_marker=src.marker, target_marker=tgt.marker,
                      vocab_align="soft", soft_lookup=lookup)

A WordPiece side has no word-start marker (its `continuation` prefix marks the opposite);
align it with `normalization="text"` and both conventions, which compares decoded text.

`fusellm_kernels.reference.alignment` holds the plain-Python originals these reproduce.
"""
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
