"""`nn.Module` wrappers of the functional losses: options fixed at construction."""
from __future__ import annotations

from torch import Tensor, nn

from fusellm_kernels.functional import fusion_loss
from fusellm_kernels.types import Backend, Divergence, FusionLossParts, Reduction, Strategy
from fusellm_kernels.validation import check_options


class FusionLoss(nn.Module):
    """`fusion_loss` as a module; per-batch tensors go to `forward`, options to the constructor."""

    def __init__(
        self,
        *,
        strategy: Strategy = "min_ce",
        lam: float = 0.9,
        temperature: float = 1.0,
        ce_temperature: float = 1.0,
        divergence: Divergence = "soft_ce",
        ignore_index: int = -100,
        reduction: Reduction = "mean",
        return_parts: bool = False,
        validate: bool = False,
        backend: Backend = "auto",
        inplace_backward: bool = False,
    ) -> None:
        super().__init__()
        # Fail at construction, not at the first batch, for options that need no data.
        check_options(
            strategy=strategy, divergence=divergence, reduction=reduction, backend=backend, lam=lam,
            temperature=temperature, ce_temperature=ce_temperature,
        )
        self.options = dict(
            strategy=strategy, lam=lam, temperature=temperature, ce_temperature=ce_temperature,
            divergence=divergence, ignore_index=ignore_index, reduction=reduction, return_parts=return_parts,
            validate=validate, backend=backend, inplace_backward=inplace_backward,
        )

    def forward(
        self,
        logits: Tensor,
        labels: Tensor,
        teacher_ids: Tensor,
        teacher_logits: Tensor,
        *,
        teacher_ce: Tensor | None = None,
        segment_ids: Tensor | None = None,
        source_weights: Tensor | None = None,
        fusion_mask: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, FusionLossParts]:
        return fusion_loss(
            logits, labels, teacher_ids, teacher_logits, teacher_ce=teacher_ce, segment_ids=segment_ids,
            source_weights=source_weights, fusion_mask=fusion_mask, **self.options,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())

