"""Alignment between tokenizers (pure CPU): token DTW, vocabulary maps, conventions, position maps."""
from fusellm_kernels.align.min_ed import dtw_mappings, min_ed_alignment
from fusellm_kernels.align.vocab_map import soft_lookup, vocab_list, vocab_map

__all__ = ["dtw_mappings", "min_ed_alignment", "soft_lookup", "vocab_list", "vocab_map"]
