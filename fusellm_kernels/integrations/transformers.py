"""One-line fusion training for `transformers` causal LMs:

    model = fuse_causal_lm(AutoModelForCausalLM.from_pretrained(path), strategy="min_ce", lam=0.9)
    out = model(input_ids, attention_mask=mask, labels=input_ids,
                teacher_ids=ids, teacher_logits=logits, teacher_ce=ce)   # out.loss; out.logits is None
    # the top-k tail: fuse_causal_lm(model, teacher_tail="bucket"), then also pass teacher_lse=lse [S, B, T]

The model's lm_head becomes a `FusionHead` sharing its parameters (tied embeddings stay
tied), and its forward, when given teacher tensors, runs the decoder and the fused linear
fusion loss on the hidden states: the [B, T, V] logits are never built. Without teachers the
model behaves exactly as before. `labels` follow the transformers convention (unshifted, as
input_ids; −100 ignored): row t is trained to predict labels[t + 1] and the last row has no
CE term. Teacher tensors are per row, [S, B, T, K] (row t's teacher predicts token t + 1),
as the alignment stage produces them. Under FSDP2, shard `model.lm_head` as a unit.
"""
from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from fusellm_kernels.losses import FusionHead

_TEACHER_KEYS = ("teacher_ce", "segment_ids", "source_weights", "fusion_mask", "teacher_lse")


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """transformers-style labels [B, T] → the target of each row: labels[:, t + 1], last row ignored."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore_index)], dim=1)


def fuse_causal_lm(model: nn.Module, **loss_options: Any) -> nn.Module:
    """Make `model` (any AutoModelForCausalLM whose base model returns hidden states) return the
    fusion loss when called with teacher tensors. `loss_options` are `FusionLoss`'s options."""
    head = model.get_output_embeddings()
    if isinstance(head, FusionHead):
        raise ValueError("this model already has a FusionHead; call fuse_causal_lm once")
    if not isinstance(head, nn.Linear):
        raise TypeError(f"the model's output embeddings are a {type(head).__name__}, not an nn.Linear; fuse_causal_lm needs a linear lm_head")
    fusion_head = FusionHead(head, **loss_options)
    model.set_output_embeddings(fusion_head)
    base = getattr(model, model.base_model_prefix)
    plain_forward = model.forward
    ignore_index = fusion_head.loss.options["ignore_index"]

    def forward(self, input_ids=None, attention_mask=None, labels=None, teacher_ids=None, teacher_logits=None, **kwargs):
        teacher_tensors = {k: kwargs.pop(k) for k in _TEACHER_KEYS if k in kwargs}
        if teacher_ids is None:
            return plain_forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if labels is None or teacher_logits is None:
            raise ValueError("the fusion loss needs labels and teacher_logits together with teacher_ids")
        kwargs.setdefault("use_cache", False)
        out = base(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        result = self.get_output_embeddings()(hidden, shift_labels(labels, ignore_index), teacher_ids, teacher_logits, **teacher_tensors)
        loss, parts = result if isinstance(result, tuple) else (result, None)
        output = CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=getattr(out, "hidden_states", None))
        if parts is not None:
            output["fusion_parts"] = parts
        return output

    model.forward = types.MethodType(forward, model)
    return model
