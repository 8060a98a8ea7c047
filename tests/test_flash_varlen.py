"""Packed documents under transformers' flash-attention varlen path, as training runs them.

`fusellm train --attention document --attn-implementation flash_attention_2` packs several
documents per block and passes no attention mask: transformers reads the document boundaries
from the `position_ids`, which restart at every document piece (training/README.md). The
check: each document's logits in the packed block equal those of the document run alone, on
a tiny randomly initialised Llama in bf16, through `FusionLM.forward` itself (its head
replaced by the bare lm_head, so the logits come back instead of the loss), for one block
per forward (`--micro-batch 1`, the default) and for two (`--micro-batch 2`: transformers
5.x infers packed sequences from position_ids only at batch size 1, so FusionLM passes the
micro-batch's blocks to the model as one row). The CUDA tests need
flash-attn (bench/gpu_check.sh runs them only where `import flash_attn` works); the CPU twins
run the same helper with sdpa, where FusionLM adds the block-diagonal mask instead.
"""
from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

BLOCKS = ((37, 64, 5, 90), (90, 5, 64, 37))  # the documents packed into each block of 196 rows


class _LogitsHead(nn.Module):
    """Stands in for the FusionHead: FusionLM calls it with the loss inputs, it returns logits."""

    def __init__(self, lm_head: nn.Module) -> None:
        super().__init__()
        self.lm_head = lm_head

    def forward(self, hidden: Tensor, *args, **kwargs) -> tuple[Tensor, None]:
        return self.lm_head(hidden), None


def check_packed_documents(device: torch.device, attn_implementation: str, dtype: torch.dtype, micro_batch: int) -> None:
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, LlamaConfig

    from fusellm_kernels.pipeline.batches import _positions
    from fusellm_kernels.training.parallel import FusionLM

    torch.manual_seed(0)
    # a larger initialiser than the default 0.02 so attention is far from uniform: a document
    # that saw its neighbours would differ well beyond bf16's rounding
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)
    lm = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)  # as training builds it
    lm = lm.to(device=device, dtype=dtype).eval()
    head = _LogitsHead(lm.get_output_embeddings())
    lm.get_output_embeddings = lambda: head  # FusionLM finds its head by role

    blocks = BLOCKS[:micro_batch]
    doc_index = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]) for lengths in blocks])
    position_ids = _positions(doc_index)
    input_ids = torch.randint(0, config.vocab_size, doc_index.shape, generator=torch.Generator().manual_seed(1))
    assert position_ids[0, blocks[0][0]] == 0 and position_ids[0, -1] == blocks[0][-1] - 1
    ids, pos, docs = (t.to(device) for t in (input_ids, position_ids, doc_index))
    loss_inputs = (None,) * 6  # labels, teacher ids/logits/ce, segment ids, source weights: the head ignores them
    with torch.no_grad():
        packed, _ = FusionLM(lm, attention="document")(ids, pos, docs, *loss_inputs)
        leaky, _ = FusionLM(lm, attention="block")(ids, pos, docs, *loss_inputs)  # every row sees the whole block
        for b, lengths in enumerate(blocks):
            start = 0
            for i, n in enumerate(lengths):
                alone = lm(input_ids=ids[b:b + 1, start:start + n], use_cache=False).logits.float()
                got = packed[b:b + 1, start:start + n].float()
                scale = float(alone.abs().max())
                # bf16: its own rounding (2**-8 relative) through 2 layers whose matmuls have other
                # shapes packed than alone (sdpa on a CPU: up to 2**-7 of the largest logit)
                tol = scale * (2**-5 if dtype != torch.float32 else 1e-5)
                err = float((got - alone).abs().max())
                where = f"block {b} of {micro_batch}, document {i} ({n} rows)"
                assert err <= tol, f"{where}: packed differs from alone by {err:.3e} > {tol:.3e}"
                if i > 0:  # the control: without the boundaries the later documents do change
                    leak = float((leaky[b:b + 1, start:start + n].float() - alone).abs().max())
                    assert leak > 4 * tol, f"{where}: seeing the block changes it by only {leak:.3e} (tol {tol:.3e})"
                start += n


@pytest.mark.cuda
@pytest.mark.parametrize("micro_batch", [1, 2])
def test_cuda_flash_attention_varlen_keeps_documents_apart(micro_batch):
    pytest.importorskip("flash_attn")
    check_packed_documents(torch.device("cuda"), "flash_attention_2", torch.bfloat16, micro_batch)


@pytest.mark.parametrize("micro_batch", [1, 2])
def test_cpu_twin_sdpa_keeps_documents_apart(micro_batch):
    check_packed_documents(torch.device("cpu"), "sdpa", torch.float32, micro_batch)


def test_flash_attention_gets_one_row_per_micro_batch():
    """transformers reads packed documents from position_ids only at batch size 1, so FusionLM
    hands flash-attention the micro-batch's blocks as one row and splits the hidden states
    back; sdpa keeps the batch (and gets the block-diagonal mask)."""
    from types import SimpleNamespace

    from fusellm_kernels.pipeline.batches import _positions
    from fusellm_kernels.training.parallel import FusionLM

    class Base(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(64, 8)
            self.seen: list[dict] = []

        def get_input_embeddings(self) -> nn.Module:
            return self.emb

        def forward(self, input_ids, position_ids=None, attention_mask=None, use_cache=False):
            self.seen.append({"input_ids": input_ids, "position_ids": position_ids, "mask": attention_mask})
            # a row's hidden state depends on its token and position only: the split-back order shows
            return SimpleNamespace(last_hidden_state=self.emb(input_ids) + position_ids[..., None].float())

    class LM(nn.Module):
        base_model_prefix = "model"

        def __init__(self, impl: str) -> None:
            super().__init__()
            self.model = Base()
            self.config = SimpleNamespace(_attn_implementation=impl)
            self.head = _LogitsHead(nn.Identity())

        def get_output_embeddings(self) -> nn.Module:
            return self.head

    doc_index = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 1, 1, 1, 2, 2]])
    ids = torch.randint(0, 64, doc_index.shape, generator=torch.Generator().manual_seed(3))
    pos = _positions(doc_index)
    outs = {}
    for impl in ("sdpa", "flash_attention_2"):
        lm = LM(impl)
        torch.manual_seed(0)
        lm.model.emb.reset_parameters()
        outs[impl], _ = FusionLM(lm, attention="document")(ids, pos, doc_index, *(None,) * 6)
        seen = lm.model.seen[-1]
        if impl == "flash_attention_2":
            assert seen["input_ids"].shape == (1, 12) and seen["mask"] is None
            assert torch.equal(seen["position_ids"], pos.reshape(1, -1)) and seen["position_ids"][0, 6] == 0
        else:
            assert seen["input_ids"].shape == (2, 6) and seen["mask"] is not None
    assert outs["flash_attention_2"].shape == (2, 6, 8)
    torch.testing.assert_close(outs["flash_attention_2"], outs["sdpa"], rtol=0, atol=0)
