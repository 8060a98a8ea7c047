"""`nn.Module` wrappers of the functional losses: options fixed at construction."""
from __future__ import annotations

from torch import Tensor, nn

from fusellm_kernels.functional import fusion_loss
from fusellm_kernels.fused_linear import fused_linear_fusion_loss
from fusellm_kernels.types import Backend, Divergence, FusionLossParts, Reduction, Strategy, TeacherTail
from fusellm_kernels.validation import FusionInputError, check_options


class _LossOptions(nn.Module):
    """Options shared by the loss modules, checked at construction (not at the first batch)."""

    def __init__(
        self,
        *,
        strategy: Strategy = "min_ce",
        lam: float = 0.9,
        temperature: float = 1.0,
        ce_temperature: float = 1.0,
        divergence: Divergence = "soft_ce",
        teacher_tail: TeacherTail = "renormalize",
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
            temperature=temperature, ce_temperature=ce_temperature, teacher_tail=teacher_tail,
        )
        self.options = dict(
            strategy=strategy, lam=lam, temperature=temperature, ce_temperature=ce_temperature,
            divergence=divergence, teacher_tail=teacher_tail, ignore_index=ignore_index, reduction=reduction, return_parts=return_parts,
            validate=validate, backend=backend, inplace_backward=inplace_backward,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class FusionLoss(_LossOptions):
    """`fusion_loss` as a module; per-batch tensors go to `forward`, options to the constructor."""

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
        teacher_lse: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, FusionLossParts]:
        return fusion_loss(
            logits, labels, teacher_ids, teacher_logits, teacher_ce=teacher_ce, segment_ids=segment_ids,
            source_weights=source_weights, fusion_mask=fusion_mask, teacher_lse=teacher_lse, **self.options,
        )


class FusedLinearFusionLoss(_LossOptions):
    """`fused_linear_fusion_loss` as a module: forward(hidden, weight, labels, teacher_ids, teacher_logits, ...)."""

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        teacher_ids: Tensor,
        teacher_logits: Tensor,
        *,
        bias: Tensor | None = None,
        teacher_ce: Tensor | None = None,
        segment_ids: Tensor | None = None,
        source_weights: Tensor | None = None,
        fusion_mask: Tensor | None = None,
        teacher_lse: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, FusionLossParts]:
        return fused_linear_fusion_loss(
            hidden, weight, labels, teacher_ids, teacher_logits, bias=bias, teacher_ce=teacher_ce,
            segment_ids=segment_ids, source_weights=source_weights, fusion_mask=fusion_mask, teacher_lse=teacher_lse,
            **self.options,
        )


class FusionHead(nn.Module):
    """An lm_head that returns the fusion loss instead of the logits when given teachers.

    Built from an existing `nn.Linear` (its parameters are shared, tied embeddings included).
    Under FSDP2, shard this module (`fully_shard(model.lm_head)`): its forward runs where FSDP
    has gathered the weight, and the loss never materialises the [N, V] logits.
    Without `teacher_ids`, forward returns the logits like the original head.
    """

    def __init__(self, linear: nn.Linear, **loss_options) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.loss = FusedLinearFusionLoss(**loss_options)

    def forward(self, hidden: Tensor, labels: Tensor | None = None, teacher_ids: Tensor | None = None, teacher_logits: Tensor | None = None, **tensors: Tensor | None):
        if teacher_ids is None:
            return nn.functional.linear(hidden, self.weight, self.bias)
        if labels is None or teacher_logits is None:
            raise FusionInputError("FusionHead needs labels and teacher_logits together with teacher_ids")
        return self.loss(hidden, self.weight, labels, teacher_ids, teacher_logits, bias=self.bias, **tensors)

