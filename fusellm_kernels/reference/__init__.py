"""Readable, dense PyTorch references. Tests and benchmarks import these; nothing re-types them."""
from fusellm_kernels.reference.fusion_loss import (
    candidate_distributions,
    candidate_weights,
    dense_fused_teacher,
    fusion_loss_gather,
    fusion_loss_reference,
)

__all__ = [
    "candidate_distributions",
    "candidate_weights",
    "dense_fused_teacher",
    "fusion_loss_gather",
    "fusion_loss_reference",
]
