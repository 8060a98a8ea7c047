"""fused_linear_fusion_loss against fusion_loss on materialised logits and the float64 reference;
FusionHead under 2-rank FSDP2; the transformers integration on tiny Llama and GPT-2 models."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from fusellm_kernels import FusedLinearFusionLoss, FusionHead, FusionInputError, fused_linear_fusion_loss, fusion_loss
from fusellm_kernels.reference import fusion_loss_reference
from tests.test_fusion_loss import make_case
from tests.tolerance import assert_close, assert_close_fp32


def linear_case(n=13, v=300, h=24, *, seed=0, dtype=torch.float32, bias=True, batch=None):
    case = make_case(n=n, v=v, seed=seed, batch=batch)
    case.pop("logits")
    g = torch.Generator().manual_seed(seed + 100)
    hidden = torch.randn(n, h, generator=g)
    if batch is not None:
        hidden = hidden.reshape(*batch, h)
    weight = torch.randn(v, h, generator=g) / h**0.5
    b = torch.randn(v, generator=g) if bias else None
    return (hidden.to(dtype), weight.to(dtype), None if b is None else b.to(dtype)), case


def grads_of(fn, params, upstream):
    leaves = [None if p is None else p.detach().clone().requires_grad_() for p in params]
    out = fn(*leaves)
    present = [p for p in leaves if p is not None]
    return out, torch.autograd.grad(out, present, upstream.to(out.dtype))


def ours_and_reference(params, tensors, upstream_seed=1, **kw):
    upstream = None

    def ours(hidden, weight, bias):
        return fused_linear_fusion_loss(hidden, weight, **tensors, bias=bias, **kw)

    def ref(hidden, weight, bias):
        logits = hidden @ weight.T + (bias if bias is not None else 0)
        return fusion_loss_reference(logits, **tensors, **{k: v for k, v in kw.items() if k not in ("backend", "chunk_rows")})

    double = [None if p is None else p.double() for p in params]
    with torch.no_grad():
        shape = ref(*double).shape
    upstream = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(upstream_seed))
    out, g = grads_of(ours, params, upstream)
    ref_out, ref_g = grads_of(ref, double, upstream)
    return out, g, ref_out, ref_g


@pytest.mark.parametrize("strategy", ["min_ce", "avg_ce", "softmin_ce", "weights"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_every_strategy_with_several_chunks(strategy, backend):
    params, tensors = linear_case(seed=len(strategy))
    reduction = {"min_ce": "mean", "avg_ce": "sum", "softmin_ce": "none", "weights": "mean"}[strategy]
    out, g, ref, gr = ours_and_reference(params, tensors, strategy=strategy, reduction=reduction, backend=backend,
                                         chunk_rows=5, divergence="kl" if strategy == "avg_ce" else "soft_ce")
    assert_close_fp32(out, ref, what="loss")
    for name, a, b in zip(("hidden", "weight", "bias"), g, gr):
        assert_close_fp32(a, b, what=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_bias_large_vocab_irregular(backend):
    params, tensors = linear_case(n=6, v=70_001, h=7, seed=3, bias=False)
    out, g, ref, gr = ours_and_reference(params, tensors, backend=backend, chunk_rows=4)
    assert len(g) == 2
    assert_close_fp32(out, ref, what="loss")
    for name, a, b in zip(("hidden", "weight"), g, gr):
        assert_close_fp32(a, b, what=name)


def test_equals_fusion_loss_on_materialised_logits_batched():
    params, tensors = linear_case(n=12, seed=4, batch=(3, 4))
    hidden, weight, bias = params
    a = fused_linear_fusion_loss(hidden, weight, **tensors, bias=bias, strategy="softmin_ce", return_parts=True)
    b = fusion_loss(hidden @ weight.T + bias, **tensors, strategy="softmin_ce", return_parts=True)
    assert_close_fp32(a[0], b[0], what="loss")
    assert torch.equal(a[1].wins, b[1].wins)
    assert_close_fp32(a[1].fusion, b[1].fusion, what="fusion part")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_rows_ignored(backend):
    params, tensors = linear_case(n=7, seed=5)
    tensors["labels"][:] = -100
    out, g, _, _ = ours_and_reference(params, tensors, backend=backend, chunk_rows=3)
    assert float(out.detach()) == 0.0
    assert all(bool((t == 0).all()) for t in g)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_by_policy(backend):
    params, tensors = linear_case(n=10, v=400, h=32, seed=6, dtype=torch.bfloat16)
    out, g, ref, gr = ours_and_reference(params, tensors, backend=backend, chunk_rows=4, strategy="avg_ce")

    def lowp(hidden, weight, bias):
        return fusion_loss_reference(hidden @ weight.T + bias, **tensors, strategy="avg_ce", dtype=torch.bfloat16)

    upstream = torch.randn((), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lp, lp_g = grads_of(lowp, params, upstream)
    assert all(t.dtype == torch.bfloat16 for t in g)
    assert_close(out, ref, lp, what="loss")
    for name, a, b, c in zip(("hidden", "weight", "bias"), g, gr, lp_g):
        assert_close(a, b, c, what=name)


def test_deterministic_and_chunking_invariant():
    params, tensors = linear_case(n=11, seed=7)
    runs = [grads_of(lambda h, w, b, c=c: fused_linear_fusion_loss(h, w, **tensors, bias=b, chunk_rows=c), params, torch.ones(()))
            for c in (3, 3, 11)]
    assert torch.equal(runs[0][0], runs[1][0]) and all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert_close_fp32(runs[0][0], runs[2][0], what="chunked vs one chunk")


def test_bad_shapes_are_named():
    (hidden, weight, bias), tensors = linear_case(n=5, seed=8)
    with pytest.raises(FusionInputError, match="weight has shape"):
        fused_linear_fusion_loss(hidden, weight[:, :3], **tensors)
    with pytest.raises(FusionInputError, match="bias has shape"):
        fused_linear_fusion_loss(hidden, weight, **tensors, bias=bias[:4])
    with pytest.raises(FusionInputError, match="bfloat16 on cpu but hidden is torch.float32"):
        fused_linear_fusion_loss(hidden, weight.bfloat16(), **tensors)


def test_modules():
    (hidden, weight, bias), tensors = linear_case(n=8, seed=9)
    module = FusedLinearFusionLoss(strategy="avg_ce", lam=0.5)
    assert torch.equal(module(hidden, weight, **tensors, bias=bias),
                       fused_linear_fusion_loss(hidden, weight, **tensors, bias=bias, strategy="avg_ce", lam=0.5))
    linear = nn.Linear(24, 300)
    head = FusionHead(linear, strategy="avg_ce", lam=0.5)
    assert head.weight is linear.weight
    assert torch.equal(head(hidden), linear(hidden))
    assert torch.equal(head(hidden, **tensors), module(hidden, linear.weight, **tensors, bias=linear.bias))


# ---- FSDP2 ----

class _TinyModel(nn.Module):
    def __init__(self, v: int, h: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(v, h)
        self.block = nn.Linear(h, h)
        self.lm_head = FusionHead(nn.Linear(h, v), strategy="min_ce")

    def forward(self, input_ids, labels, teacher_ids, teacher_logits, teacher_ce):
        hidden = torch.tanh(self.block(self.embed(input_ids)))
        return self.lm_head(hidden, labels, teacher_ids, teacher_logits, teacher_ce=teacher_ce)


def _fsdp_batch():
    case = make_case(n=16, v=96, seed=10, adversarial=False, batch=(2, 8))
    return torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(3)), case


def _fsdp_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = _TinyModel(96, 16)
    fully_shard(model.lm_head)
    fully_shard(model)
    ids, case = _fsdp_batch()
    loss = model(ids, case["labels"], case["teacher_ids"], case["teacher_logits"], case["teacher_ce"])
    loss.backward()
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    if rank == 0:
        torch.save({"loss": loss.detach(), "grads": grads}, out_file)
    # both ranks leave together: a rank that tore its gloo pairs down while the other was
    # still saving aborted it now and then ("terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()


def test_fsdp2_two_ranks_equal_one_process():
    """Every rank runs the same batch, so FSDP's averaged gradients equal one process's."""
    torch.manual_seed(0)
    model = _TinyModel(96, 16)
    ids, case = _fsdp_batch()
    loss = model(ids, case["labels"], case["teacher_ids"], case["teacher_logits"], case["teacher_ce"])
    loss.backward()
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "rank0.pt")
        mp.spawn(_fsdp_worker, args=(2, os.path.join(tmp, "init"), out_file), nprocs=2, join=True)
        result = torch.load(out_file)
    assert_close_fp32(result["loss"], loss.detach(), what="loss")
    for name, p in model.named_parameters():
        assert_close_fp32(result["grads"][name], p.grad, what=name)


# ---- transformers ----

def _tiny_models():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=80, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    return {"llama": llama, "gpt2": gpt2}


@pytest.mark.parametrize("arch,tail", [("llama", "renormalize"), ("gpt2", "renormalize"), ("llama", "bucket")])
def test_transformers_integration(arch, tail):
    from fusellm_kernels.integrations.transformers import fuse_causal_lm, shift_labels

    model = _tiny_models()[arch].eval()
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 80, (2, 9), generator=g)
    labels = input_ids.clone()
    labels[0, :3] = -100
    s, k = 3, 4
    teacher_ids = torch.randint(-1, 80, (s, 2, 9, k), generator=g)
    teacher_logits = torch.randn(s, 2, 9, k, generator=g)
    teacher_ce = torch.rand(s, 2, 9, generator=g)
    extra = {}
    if tail == "bucket":  # each teacher's top-k holds about half of its mass
        extra = dict(teacher_lse=teacher_logits.logsumexp(-1) + 0.7)

    logits = model(input_ids).logits
    expected = fusion_loss(logits, shift_labels(labels), teacher_ids, teacher_logits, teacher_ce=teacher_ce, strategy="avg_ce",
                           teacher_tail=tail, **extra)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()), allow_unused=True)

    fused = fuse_causal_lm(model, strategy="avg_ce", teacher_tail=tail)
    out = fused(input_ids, labels=labels, teacher_ids=teacher_ids, teacher_logits=teacher_logits, teacher_ce=teacher_ce, **extra)
    assert out.logits is None
    grads = torch.autograd.grad(out.loss, list(fused.parameters()), allow_unused=True)
    assert_close_fp32(out.loss, expected, what="loss")
    for a, b in zip(grads, expected_grads):
        if b is not None:
            assert_close_fp32(a, b, what="param grad")
    assert torch.equal(fused(input_ids).logits, logits)  # no teachers: the model is unchanged
    if arch == "gpt2":
        assert fused.lm_head.weight is fused.transformer.wte.weight  # tied embeddings stay tied


@pytest.mark.cuda
def test_cuda_bf16_without_host_sync():
    params, tensors = linear_case(n=512, v=32_000, h=256, seed=11, dtype=torch.bfloat16)
    params = [p.cuda() for p in params]
    tensors = {k: t.cuda() for k, t in tensors.items()}
    leaves = [p.clone().requires_grad_() for p in params]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = fused_linear_fusion_loss(leaves[0], leaves[1], **tensors, bias=leaves[2], chunk_rows=128)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    double = [p.double().requires_grad_() for p in params]
    ref64 = fusion_loss_reference(double[0] @ double[1].T + double[2], **tensors)
    ref64.backward()
    lowp = [p.clone().requires_grad_() for p in params]
    lp = fusion_loss_reference(lowp[0] @ lowp[1].T + lowp[2], **tensors, dtype=torch.bfloat16)
    lp.backward()
    assert_close(loss.detach(), ref64.detach(), lp.detach(), what="loss")
    for a, b, c in zip(leaves, double, lowp):
        assert_close(a.grad, b.grad, c.grad, what="grad")


def test_weight_gradient_slices_accumulate_like_one_product(monkeypatch):
    """The low-precision weight gradient is added in vocabulary slices when no fp32-output
    matmul is available; many small slices must give the one-slice result."""
    import fusellm_kernels.fused_linear as fl

    params, tensors = linear_case(n=10, v=300, h=16, seed=12, dtype=torch.bfloat16)
    _, whole = grads_of(lambda h, w, b: fused_linear_fusion_loss(h, w, **tensors, bias=b, chunk_rows=4), params, torch.ones(()))
    monkeypatch.setattr(fl, "_WGRAD_SLICE_BYTES", 16 * 2 * 7)  # 7 vocabulary rows per slice
    _, sliced = grads_of(lambda h, w, b: fused_linear_fusion_loss(h, w, **tensors, bias=b, chunk_rows=4), params, torch.ones(()))
    assert all(torch.equal(a, b) for a, b in zip(whole, sliced))
