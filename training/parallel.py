"""The process group, and the model built on the meta device, sharded with FSDP2 and loaded.

Building order (no process ever holds the whole unsharded model):
1. the transformers model is created on the meta device from its config (no memory);
2. its lm_head becomes a `FusionHead` (the fused linear fusion loss; no [N, V] logits);
3. `fully_shard` each decoder layer, then the head (unless tied to the input embedding,
   whose parameter the root owns), then the root wrapper `FusionLM`;
4. `to_empty` allocates each rank's shards only, and the weights are streamed from the
   safetensors files one tensor at a time, each rank copying its own slice.

Gradients: each rank's loss is a *sum* over its rows divided by the global number of target
tokens of the optimiser step, so FSDP's reduce-scatter must sum, not average:
`set_gradient_divide_factor(1.0)` on every FSDP unit.
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fusellm_kernels.losses import FusionHead
from fusellm_kernels.types import FusionLossParts


class ModelError(RuntimeError):
    """The model directory cannot be used; the message names the file."""


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device
    mesh: Any            # the 1-D DeviceMesh FSDP2 shards over
    owns_group: bool     # this module created the process group and destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> Dist:
    """Join the torchrun process group, or make a one-process group when run directly
    (FSDP2 and DCP need one; a one-rank mesh shards nothing)."""
    from torch.distributed.device_mesh import init_device_mesh

    from fusellm_kernels.training.config import check_device

    check_device(device)
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        backend = "cuda:nccl,cpu:gloo" if cuda else "gloo"  # gloo for the CPU-side collectives of DCP
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            with socket.socket() as s:  # a free port for the one-process group
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    world = dist.get_world_size()
    mesh = init_device_mesh(dev.type, (world,))
    return Dist(dist.get_rank(), world, dev, mesh, owns)


def close_distributed(d: Dist) -> None:
    if d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


class FusionLM(nn.Module):
    """A causal LM with a `FusionHead`: forward(batch) -> (summed loss, parts).

    The FSDP2 root: calling the base model and the head from one root forward lets FSDP
    gather the root's own parameters (embeddings, final norm) around both.
    """

    def __init__(self, lm: nn.Module, attention: str) -> None:
        super().__init__()
        self.lm = lm
        self.attention = attention
        # state-dict key -> the key the source checkpoint used, where they differ (set on load,
        # kept by the export so it reads like the source)
        self.checkpoint_names: dict[str, str] = {}

    def forward(self, input_ids: Tensor, position_ids: Tensor, doc_index: Tensor, labels: Tensor, teacher_ids: Tensor,
                teacher_logits: Tensor, teacher_ce: Tensor, segment_ids: Tensor,
                source_weights: Tensor | None, fusion_mask: Tensor | None = None,
                teacher_lse: Tensor | None = None) -> tuple[Tensor, FusionLossParts]:
        base = getattr(self.lm, self.lm.base_model_prefix)
        kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": False}
        if self.attention == "document":
            kwargs["position_ids"] = position_ids
            if self.lm.config._attn_implementation != "flash_attention_2":
                # sdpa/eager: an additive block-diagonal causal mask keeps each document to
                # itself (flash-attention instead reads the boundaries from position_ids)
                kwargs["attention_mask"] = document_mask(doc_index, base.get_input_embeddings().weight.dtype)
        flat = self.attention == "document" and self.lm.config._attn_implementation == "flash_attention_2" and input_ids.shape[0] > 1
        if flat:
            # transformers infers packed sequences from position_ids only at batch size 1: the
            # micro-batch's blocks go in as one row (each block starts a piece at position 0)
            kwargs["input_ids"], kwargs["position_ids"] = input_ids.reshape(1, -1), position_ids.reshape(1, -1)
        hidden = base(**kwargs).last_hidden_state
        if flat:
            hidden = hidden.reshape(*input_ids.shape, hidden.shape[-1])
        # the head by role, not by name: GPT-NeoX calls it embed_out
        return self.lm.get_output_embeddings()(hidden, labels, teacher_ids, teacher_logits, teacher_ce=teacher_ce,
                                               segment_ids=segment_ids, source_weights=source_weights, fusion_mask=fusion_mask,
                                               teacher_lse=teacher_lse)


def document_mask(doc_index: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, 1, L, L] additive mask: row i sees row j ≤ i of the same document piece (padding
    rows, doc_index −1, see each other, so no row is fully masked)."""
    length = doc_index.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=doc_index.device).tril()
    allowed = (doc_index[:, :, None] == doc_index[:, None, :]) & causal
    return torch.zeros(allowed.shape, dtype=dtype, device=doc_index.device).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def output_weight_name(lm: nn.Module) -> str:
    """The state-dict key of the output layer's weight: lm_head.weight for most models,
    embed_out.weight for GPT-NeoX."""
    head = lm.get_output_embeddings()
    return next(f"{name}.weight" for name, module in lm.named_modules() if module is head)


def _decoder_layers(lm: nn.Module) -> list[nn.Module]:
    base = getattr(lm, lm.base_model_prefix)
    for name in ("layers", "h", "blocks", "decoder.layers"):
        try:
            layers = base.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return list(layers)
    raise ModelError(f"cannot find the decoder layers of {type(lm).__name__} (looked for layers, h, blocks); FSDP2 shards per layer")


def build_model(path: str, d: Dist, *, loss_options: dict[str, Any], attn_implementation: str, attention: str,
                param_dtype: torch.dtype, activation_checkpointing: bool, progress: bool = False) -> FusionLM:
    """Build, shard and load the model of a local transformers directory (see the module docstring)."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    root = Path(path)
    if not (root / "config.json").exists():
        raise ModelError(f"{root / 'config.json'} is missing: --model must be a local transformers model directory")
    config = AutoConfig.from_pretrained(root, local_files_only=True)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    head = lm.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ModelError(f"{root}: the output layer is a {type(head).__name__}, not an nn.Linear; the fused loss needs a linear head")
    lm.set_output_embeddings(FusionHead(head, **loss_options))
    tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    if activation_checkpointing:
        if hasattr(lm, "activation_checkpointing_enable"):  # newer transformers' name
            lm.activation_checkpointing_enable({"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = FusionLM(lm, attention)

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in _decoder_layers(lm):
        fully_shard(layer, mesh=d.mesh, mp_policy=mp)
    if not tied:  # a tied head shares the embedding's parameter, which the root group owns
        fully_shard(lm.get_output_embeddings(), mesh=d.mesh, mp_policy=mp)
    fully_shard(model, mesh=d.mesh, mp_policy=mp)
    for module in model.modules():  # the setting is per FSDP unit
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            if d.device.type != "cuda":
                module.set_force_sum_reduction_for_comms(True)  # gloo lacks NCCL's PREMUL_SUM

    model.to_empty(device=d.device)
    model.checkpoint_names = _load_weights(lm, root, tied, progress and d.is_main)
    owners = {n.rsplit(".", 1)[0] for n, _ in lm.named_non_persistent_buffers()}
    for name in owners:  # buffers computed in __init__ (rotary frequencies) were left on meta
        lm._init_weights(lm.get_submodule(name))
    return model


class FrozenSharding:
    """Shards a frozen candidate (online fusion, `--candidate-sharding shard`) with FSDP2 like
    the target: per decoder layer, then the root, each layer's weights gathered for its
    forward and freed after (`reshard_after_forward`); no gradients, no optimiser state.

    The candidates get a process group of their own (`group`), over which the ranks keep
    their candidate calls in step (`pipeline.live.LiveTeacher.records`), and run on the
    training loop's thread (the trainer turns its prefetch thread off: gathering their layers
    from that thread while training's collectives ran made gloo mix the two groups' messages).
    Each candidate is loaded whole on every rank first, then sharded: the peak is one whole
    candidate per rank at start-up."""

    def __init__(self, d: Dist) -> None:
        from torch.distributed.device_mesh import DeviceMesh

        self.group = dist.new_group(backend="nccl" if d.device.type == "cuda" else "gloo")
        self.mesh = DeviceMesh.from_group(self.group, d.device.type)

    def __call__(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import fully_shard

        for layer in _decoder_layers(model):
            fully_shard(layer, mesh=self.mesh, reshard_after_forward=True)
        fully_shard(model, mesh=self.mesh, reshard_after_forward=True)
        return model


def _safetensors_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.exists():
        return sorted({root / f for f in json.loads(index.read_text())["weight_map"].values()})
    single = root / "model.safetensors"
    if single.exists():
        return [single]
    raise ModelError(f"{root} holds neither model.safetensors nor model.safetensors.index.json; save the model with safetensors")


def _head_in_checkpoint(state: dict[str, Any], where: dict[str, tuple[Path, str]], head: str) -> dict[str, str]:
    """{model key: file key} of the output layer when the file names it otherwise: transformers
    renames some heads between module and checkpoint (GPT-NeoX: lm_head in the module,
    embed_out in the file), so the head is found by role: the one top-level layer of the file
    that the model lacks."""
    if head in where:
        return {}
    spare = {k.rsplit(".", 1)[0] for k in where if k not in state and k.count(".") == 1 and k.endswith(".weight")}
    if len(spare) != 1:
        return {}  # not found by role: the caller names the missing parameter
    prefix, other = head.rsplit(".", 1)[0], spare.pop()
    return {k: other + k[len(prefix):] for k in state if k.startswith(prefix + ".") and other + k[len(prefix):] in where}


@torch.no_grad()
def _load_weights(lm: nn.Module, root: Path, tied: bool, progress: bool) -> dict[str, str]:
    """Copy each rank's slice of every parameter from the safetensors files, one tensor at a
    time; returns {model key: file key} where the file names a parameter otherwise."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor, distribute_tensor
    from tqdm import tqdm

    where: dict[str, tuple[Path, str]] = {}
    for file in _safetensors_files(root):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                where[key] = (file, key)
    state = lm.state_dict()
    head_weight = output_weight_name(lm)
    renamed = {} if tied else _head_in_checkpoint(state, where, head_weight)
    for model_key, file_key in renamed.items():
        where[model_key] = where[file_key]
    for name, target in tqdm(state.items(), desc="load weights", unit="tensor", disable=not progress):
        if name not in where:
            if tied and name == head_weight:
                continue
            raise ModelError(f"{root}: parameter {name} is in the model's config but in none of its safetensors files")
        file, key = where[name]
        with safe_open(str(file), framework="pt") as f:
            full = f.get_tensor(key)
        if tuple(full.shape) != tuple(target.shape):
            raise ModelError(f"{file}: {key} has shape {tuple(full.shape)} but the config builds {tuple(target.shape)}")
        full = full.to(device=target.device, dtype=target.dtype)
        if isinstance(target, DTensor):
            local = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None).to_local()
            target.to_local().copy_(local)
        else:
            target.copy_(full)
    return renamed


def full_state_dict(model: FusionLM) -> dict[str, Tensor]:
    """The unsharded weights of the transformers model on rank 0's CPU (collective; other ranks get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model.lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def model_flops_per_token(lm: nn.Module, seq_len: int) -> float:
    """6 × parameters (forward + backward matmuls) + the attention scores, as in the PaLM appendix."""
    n = sum(p.numel() for p in lm.parameters())  # DTensors report their global size
    emb = lm.get_input_embeddings()
    lookup = 0 if emb.weight is lm.get_output_embeddings().weight else emb.weight.numel()  # a lookup is no matmul
    c = lm.config
    return 6.0 * (n - lookup) + 12.0 * c.num_hidden_layers * c.hidden_size * seq_len


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of known cards (for MFU); None elsewhere."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12)):
        if key in name:
            return value
    return None
