"""Knowledge-fusion training of a causal LM with FSDP2: read it top to bottom.

Launch (one node, 8 GPUs; the original FuseLLM recipe on Llama-2-7B):

    torchrun --standalone --nproc-per-node 8 -m fusellm_kernels.training.train --preset llama2-7b \\
        --model models/llama-2-7b --data blocks/minipile --output runs/fusellm-7b

    # the same data and steps, CE only (the paper's "continual training" baseline)
    torchrun --standalone --nproc-per-node 8 -m fusellm_kernels.training.train --preset llama2-7b --mode clm ...

    # several nodes: torchrun --nnodes 2 --node-rank R --rdzv-endpoint HOST:29500 ... (shared file system)
    # one process, CPU, in seconds:
    python -m fusellm_kernels.training.train --preset tiny --model tiny-llama/ --data blocks/ --output /tmp/run
    fusellm train ...   /   fusellm eval --model runs/fusellm-7b/export --data held-out-blocks/

Re-running the same command resumes from the newest checkpoint in OUTPUT/checkpoints (on
any number of ranks). OUTPUT also holds config.json (the resolved configuration),
metrics.jsonl, curves.png and export/ (a transformers folder, safetensors).

One optimiser step: the sampler picks `global_batch` blocks; each rank takes its share in
micro-batches; each micro-batch's loss is the *sum* over its rows of
λ·CE + (1 − λ)·divergence, divided by the number of target tokens of the whole step on all
ranks (one all-reduce of a count), so accumulation and ranks with fewer real tokens give the
gradient of one big batch; FSDP2 sums (not averages) the gradients across ranks.
The fusion term is thus divided by the count of CE rows too (the original divides it by all
real rows, including each document's last; the two differ by < 1 / document length).

Attention: with --attention document (default) rows attend only within their document
piece: sdpa and eager get a block-diagonal causal mask (which takes sdpa off its
flash kernel; the cost grows with L²), flash_attention_2 reads the boundaries from the
restarting position_ids (transformers' packed varlen path). --attention block lets every
row see the whole block with positions 0..L−1, as the original's packed training does.
"""
from __future__ import annotations

import fnmatch
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from fusellm_kernels.store.lock import LockedError, LockSet, confirm_holder
from fusellm_kernels.store.manifest import StoreError
from fusellm_kernels.training.checkpoint import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from fusellm_kernels.training.config import ConfigError, TrainConfig, check_resume_compatible
from fusellm_kernels.training.data import BlockSampler, Prefetcher, TrainData, check_lse, check_tokenizer, make_batch, open_data, open_online_data
from fusellm_kernels.training.metrics import MetricsLog, peak_memory_gib, plot_curves
from fusellm_kernels.training.parallel import (
    Dist, FrozenSharding, FusionLM, build_model, close_distributed, full_state_dict, init_distributed, model_flops_per_token,
    peak_flops,
    output_weight_name,
)


class TrainingError(RuntimeError):
    """Training stopped on a fault (non-finite loss or gradient); the message says where."""


def train(cfg: TrainConfig, on_step: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run (or resume) training; returns the final step, what this run did (steps_run, blocks,
    tokens, seconds, bytes_written) and where things are (output, checkpoint, export), eval_ppl.
    on_step(step, total), if given, is called on rank 0 after each optimiser step (a caller's
    own progress display, e.g. the main job's, which trains several runs at once)."""
    d = init_distributed(cfg.device)
    locks = LockSet("fusellm train")
    try:
        cfg = cfg.validate(d.world)
        _lock_output(cfg, d, locks)
        return _train(cfg, d, on_step, locks)
    finally:
        locks.release()
        close_distributed(d)


def _lock_output(cfg: TrainConfig, d: Dist, locks: LockSet) -> None:
    """One job per run directory: rank 0 locks it, every other rank checks that the lock
    names this job, and all ranks raise together when any check fails."""
    err = None
    if d.is_main:
        try:
            locks.write(cfg.output)
        except StoreError as e:
            err = str(e)
    box: list[Any] = [err, locks.job_id]
    if d.world > 1:
        dist.broadcast_object_list(box, src=0)
        if not d.is_main:
            try:
                confirm_holder(cfg.output, box[1])
            except StoreError as e:
                err = str(e)
        found: list[Any] = [None] * d.world
        dist.all_gather_object(found, err)
        err = next((e for e in found if e), None)
    if err:
        raise LockedError(err)


def _train(cfg: TrainConfig, d: Dist, on_step: Callable[[int, int], None] | None, locks: LockSet) -> dict[str, Any]:
    from transformers import AutoConfig

    out = Path(cfg.output)
    ckpt_root = out / "checkpoints"
    fusion = cfg.mode == "fusion"
    bucket = fusion and cfg.teacher_tail == "bucket"  # the batches then carry each row's teacher lse
    resume_from = latest_checkpoint(ckpt_root) if cfg.resume else None
    if resume_from is not None and (out / "config.json").exists():
        check_resume_compatible(TrainConfig.from_json(_read_json(out / "config.json")), cfg, out / "config.json")
    if not (Path(cfg.model) / "config.json").exists():
        raise ConfigError(f"--model {cfg.model!r}: {Path(cfg.model) / 'config.json'} is missing; give a local transformers model directory")
    model_config = AutoConfig.from_pretrained(cfg.model, local_files_only=True)
    from fusellm_kernels.pipeline.teacher_pass import _context_length

    context = _context_length(model_config)
    if context is not None and cfg.seq_len > context:  # positions past it were never trained (or do not exist)
        raise ConfigError(f"--seq-len {cfg.seq_len} exceeds --model {cfg.model}'s context of {context} tokens; "
                          f"use blocks of at most {context} rows")

    # 1. Data first: a missing or mismatched store fails here, before the model is loaded.
    if cfg.online:  # the candidates run live: loaded here, on this rank's device (pipeline/live.py)
        shard = FrozenSharding(d) if cfg.candidate_sharding == "shard" else None
        data = open_online_data(cfg, int(model_config.vocab_size), d.device, out / "online" / "vocab_maps",
                                locks=locks if d.is_main else None, shard=shard)
        _check_candidates(out / "online" / "candidates.json", data, d, resume_from is not None)
    else:
        data = open_data(cfg.data, cfg.eval_data, cfg.eval_holdout, seq_len=cfg.seq_len,
                         model_vocab=int(model_config.vocab_size), fusion=fusion, cache_shards=cfg.shuffle_window,
                         verify=cfg.verify, locks=locks if d.is_main else None)
        check_tokenizer(data.blocks.store, cfg.model)
        if data.eval_blocks is not None and data.eval_blocks is not data.blocks:
            check_tokenizer(data.eval_blocks.store, cfg.model)
    if bucket:
        check_lse(data)
    if fusion and cfg.strategy == "weights" and len(cfg.source_weights) != len(data.names):
        raise ConfigError(f"--source-weights has {len(cfg.source_weights)} values but the blocks have "
                          f"{len(data.names)} candidates {data.names}")
    sampler = BlockSampler(data.train_range, cfg.global_batch, cfg.seed, data.blocks.starts, cfg.shuffle_window)
    steps_total = sampler.steps_per_epoch * cfg.epochs
    steps_total = min(steps_total, cfg.max_steps) if cfg.max_steps else steps_total
    if steps_total < 1:
        raise ConfigError(f"--global-batch {cfg.global_batch}: {len(data.train_range)} training blocks make no full step")

    # 2. Model: meta device → FSDP2 shards → weights streamed in.
    param_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(
        cfg.param_dtype, torch.bfloat16 if d.device.type == "cuda" else torch.float32)
    loss_options = dict(strategy=cfg.strategy, lam=cfg.lam, temperature=cfg.temperature, ce_temperature=cfg.ce_temperature,
                        divergence=cfg.divergence, reduction="sum", return_parts=True,
                        teacher_tail=cfg.teacher_tail if fusion else "renormalize")
    if not fusion:  # CE only through the same fused head: λ = 1 and no teacher
        loss_options.update(strategy="weights", lam=1.0)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, d, loss_options=loss_options, attn_implementation=cfg.attn_implementation,
                        attention=cfg.attention, param_dtype=param_dtype, activation_checkpointing=cfg.activation_checkpointing,
                        progress=cfg.progress)

    # 3. AdamW (no decay on norms and biases, as the original's HF Trainer), warm-up + cosine.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    warmup = math.ceil(cfg.warmup_ratio * steps_total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, warmup, steps_total, cfg.min_lr_ratio))
    state = TrainState(model, optimizer, scheduler, sampler)
    if resume_from is not None:
        load_checkpoint(resume_from, state, verify=cfg.verify)
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.json")
    log = MetricsLog(out / "metrics.jsonl", d.is_main, cfg.log_every)
    log.keep_until(state.step)  # a fresh run starts a fresh log; a resumed one drops steps it will redo
    weights = torch.tensor(cfg.source_weights or [0.0], dtype=torch.float32, device=d.device)
    flops_per_token = model_flops_per_token(model.lm, cfg.seq_len)
    peak = peak_flops(d.device)
    eval_ppl = None
    if d.is_main:
        print(f"training {cfg.model} ({cfg.mode}) on {len(data.train_range)} blocks of {cfg.seq_len}: steps "
              f"{state.step + 1}..{steps_total} on {d.world} rank(s), {cfg.global_batch // (cfg.micro_batch * d.world)} "
              f"micro-batch(es) per step" + (f", resumed from {resume_from}" if resume_from else ""), file=sys.stderr)

    # 4. The loop.
    progress = _progress(cfg.progress and d.is_main, state.step, steps_total)
    prefetch = Prefetcher(lambda ix: make_batch(data, ix, fusion=fusion, weighting=cfg.weighting, top_k=cfg.top_k, device=d.device,
                                                with_lse=bucket),
                          # sharded candidates gather their layers over a group of their own; run from the
                          # prefetch thread, those collectives interleaved with training's and gloo mixed
                          # the two groups' messages (a size mismatch, then an abort): they run in step here
                          enabled=cfg.prefetch and cfg.candidate_sharding != "shard", device=d.device)
    last_saved = resume_from
    started, tokens_run, steps_run = time.perf_counter(), 0, 0
    with prefetch:
        while state.step < steps_total:
            step = state.step + 1
            t0 = time.perf_counter()
            blocks = sampler.next_global_batch()
            micro = BlockSampler.micro_batches(blocks, d.rank, d.world, cfg.micro_batch)
            # the step's global target-token count, known before any forward: one all-reduce
            mine = [i for m in micro for i in m]
            n_tokens = torch.tensor(float(sum(data.blocks.num_labels(i) for i in mine)), device=d.device)
            if d.world > 1:
                dist.all_reduce(n_tokens)
            n_cand = len(data.names)
            sums = torch.zeros(3 + 2 * n_cand, device=d.device)  # loss, ce, fusion, wins and weight mass per candidate
            model.train()
            data_s = 0.0
            for a, indices in enumerate(micro):
                # the batch after this one: the next micro-batch, or the next step's first
                upcoming = micro[a + 1] if a + 1 < len(micro) else (
                    BlockSampler.micro_batches(sampler.peek(), d.rank, d.world, cfg.micro_batch)[0] if step < steps_total else None)
                t_data = time.perf_counter()
                batch = prefetch.get(indices, upcoming)
                data_s += time.perf_counter() - t_data
                loss_sum, parts = _forward(model, batch, weights, cfg.fusion_rows)
                (loss_sum / n_tokens.clamp_min(1.0)).backward()
                per_cand = (torch.cat([parts.wins.float(), parts.weight_sums.float()]) if fusion
                            else torch.zeros(2 * n_cand, device=d.device))
                sums += torch.cat([torch.stack([loss_sum.detach(), parts.ce, parts.fusion]).float(), per_cand])
            if d.world > 1:
                dist.all_reduce(sums)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            values = (sums[:3] / n_tokens.clamp_min(1.0)).tolist() + [float(grad_norm)]  # the step's one host sync
            if not all(math.isfinite(v) for v in values):
                raise TrainingError(
                    f"non-finite {'loss' if not all(math.isfinite(v) for v in values[:3]) else 'gradient norm'} at step {step} "
                    f"(blocks {sorted(blocks)} of {cfg.data}); nothing was applied, and the newest good checkpoint is "
                    f"{last_saved or 'none (no checkpoint was written yet)'}")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step = step

            dt = time.perf_counter() - t0
            tokens = float(n_tokens)
            tokens_run, steps_run = tokens_run + int(tokens), steps_run + 1
            record = {"step": step, "loss": values[0], "ce": values[1], "fusion": values[2], "grad_norm": values[3],
                      "lr": scheduler.get_last_lr()[0], "tokens": int(tokens), "step_s": dt, "data_s": data_s, "tokens_per_s": tokens / dt,
                      "model_flops": flops_per_token * tokens,
                      "mfu": None if peak is None else flops_per_token * tokens / dt / (peak * d.world),
                      "peak_mem_gib": peak_memory_gib(d.device), "epoch": sampler.epoch}
            if cfg.online:  # the step's time split: data_s is the wait for the batch, these the work behind it
                record.update(data.blocks.take_times(), held_documents=data.blocks.held_documents)
            if fusion:
                record["wins"] = {name: int(w) for name, w in zip(data.names, sums[3:3 + n_cand].tolist())}
                # AvgCE's weights are spread over candidates; its wins table equals MinCE's by construction
                record["weight_mass"] = {name: w for name, w in zip(data.names, sums[3 + n_cand:].tolist())}
            log.write(record)
            progress.update(1)
            if on_step is not None and d.is_main:
                on_step(step, steps_total)
            if data.eval_blocks is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == steps_total):
                eval_loss, _ = evaluate(model, data, cfg, d, weights)
                eval_ppl = math.exp(min(eval_loss, 700.0))
                log.write({"step": step, "eval_loss": eval_loss, "eval_ppl": eval_ppl})
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == steps_total:
                last_saved = save_checkpoint(ckpt_root, state, cfg.keep_checkpoints)
    progress.close()
    if cfg.online:
        data.blocks.close()  # the alignment workers

    # 5. Export and curves.
    export_dir = export_model(model, cfg.model, out / "export", d) if cfg.export else None
    if cfg.plot and d.is_main and (out / "metrics.jsonl").exists():
        plot_curves(out / "metrics.jsonl", out / "curves.png")
    if d.world > 1:
        # the ranks leave together: one tearing its gloo pairs down while rank 0 still writes
        # the export and curves can abort the other ("terminate called without an active exception")
        dist.barrier()
    written = [p for folder in (last_saved, export_dir) if folder for p in Path(folder).rglob("*") if p.is_file()]
    return {"step": state.step, "steps_run": steps_run, "blocks": steps_run * cfg.global_batch, "tokens": tokens_run,
            "seconds": time.perf_counter() - started, "bytes_written": sum(p.stat().st_size for p in written),
            "output": str(out), "checkpoint": str(last_saved) if last_saved else None,
            "export": str(export_dir) if export_dir else None, "eval_ppl": eval_ppl}


def _check_candidates(path: Path, data: TrainData, d: Dist, resuming: bool) -> None:
    """--online: the candidates' model and tokenizer fingerprints are recorded with the run; a
    resume whose candidates changed (same paths, other weights included) is refused. The
    frozen candidates' weights are never saved: they are the folders these fingerprints name."""
    import json

    found = [{"model": str(t.root), "model_fingerprint": t.fingerprint, "tokenizer_fingerprint": t.tokenizer_fingerprint}
             for t in data.blocks.teachers]
    if resuming and path.exists():
        recorded = _read_json(path)
        for i, (old, new) in enumerate(zip(recorded, found)):
            if old != new:
                raise ConfigError(f"{path}: candidate {i} was {old['model']} (model {old['model_fingerprint'][:12]}) when this "
                                  f"run started but is now {new['model']} (model {new['model_fingerprint'][:12]}); resume with "
                                  "the same candidates, or pass --no-resume / another --output")
        if len(recorded) != len(found):
            raise ConfigError(f"{path}: the run started with {len(recorded)} candidates, this one has {len(found)}")
    if d.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(found, indent=1) + "\n")


def _lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to the peak over `warmup` steps (step 0 already trains, at 1/warmup of it),
    then cosine decay to `min_ratio` of the peak at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _forward(model: FusionLM, batch, weights: torch.Tensor, fusion_rows: str = "labels"):
    """(summed loss, parts) of one batch; fixed candidate weights broadcast over the rows;
    `fusion_rows="attention"` counts the fusion term on every real row, as the original does."""
    s, n = batch.teacher_ids.shape[:2]
    source_weights = None
    if model.lm.get_output_embeddings().loss.options["strategy"] == "weights":  # CLM's head too
        source_weights = (weights if s == weights.numel() else torch.zeros(s, device=weights.device))[:, None].expand(s, n)
    fusion_mask = batch.attention_mask.reshape(-1) if fusion_rows == "attention" else None
    teacher_lse = batch.teacher_lse
    if teacher_lse is None and model.lm.get_output_embeddings().loss.options["teacher_tail"] == "bucket":
        teacher_lse = torch.full((s, n), float("nan"), device=batch.teacher_ce.device)  # evaluation's empty teacher
    return model(batch.input_ids, batch.position_ids, batch.doc_index, batch.labels.reshape(-1), batch.teacher_ids,
                 batch.teacher_logits, batch.teacher_ce, batch.segment_ids, source_weights, fusion_mask, teacher_lse)


@torch.no_grad()
def evaluate(model: FusionLM, data: TrainData, cfg: TrainConfig, d: Dist, weights: torch.Tensor) -> tuple[float, int]:
    """(mean next-token CE, target tokens) over the held-out blocks (perplexity = exp of the
    mean), not the fusion loss.

    Every rank runs the same number of forwards (FSDP's collectives need it): a rank whose
    share has run out repeats a block and counts nothing from it.
    """
    assert data.eval_blocks is not None
    indices = list(data.eval_range)
    share = math.ceil(len(indices) / d.world)
    per_rank = min(share, cfg.eval_batches) if cfg.eval_batches else share
    mine = indices[d.rank * share:(d.rank + 1) * share][:per_rank]
    model.eval()
    totals = torch.zeros(2, device=d.device)  # CE sum, target tokens
    for start in range(0, per_rank, cfg.micro_batch):
        chunk = mine[start:start + cfg.micro_batch]
        use = chunk or indices[:1]
        batch = make_batch(data, use, fusion=False, weighting="token", top_k=0, device=d.device, store=data.eval_blocks)
        _, parts = _forward(model, batch, weights)
        if chunk:
            totals += torch.stack([parts.ce.float(), (batch.labels >= 0).sum().float()])
    if d.world > 1:
        dist.all_reduce(totals)
    model.train()
    return float(totals[0] / totals[1].clamp_min(1.0)), int(totals[1])


#: files of the source model directory copied into the export (tokenizer, generation settings)
_EXPORT_EXTRAS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model",
                  "generation_config.json", "chat_template*")


def export_model(model: FusionLM, source: str, target: Path, d: Dist) -> Path:
    """Write the trained weights as a transformers folder (config, safetensors, tokenizer files
    of the source directory), in the source weights' dtype. Collective; rank 0 writes."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    state = full_state_dict(model)
    if d.is_main:
        src = Path(source)
        first = next(iter(sorted(src.glob("*.safetensors"))))
        with safe_open(str(first), framework="pt") as f:
            dtype = f.get_slice(next(iter(f.keys()))).get_dtype()
        dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(dtype, torch.float32)
        lm = model.lm
        if lm.get_output_embeddings().weight is lm.get_input_embeddings().weight:
            state.pop(output_weight_name(lm), None)  # tied: transformers re-ties it on load
        state = {model.checkpoint_names.get(k, k): v for k, v in state.items()}  # the source's own key names
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        lm.config.save_pretrained(tmp)
        for p in src.iterdir():  # tokenizer and generation settings travel with the weights
            if p.is_file() and any(fnmatch.fnmatch(p.name, pattern) for pattern in _EXPORT_EXTRAS):
                shutil.copy2(p, tmp / p.name)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    dist.barrier()
    return target


def evaluate_model(model_path: str, data_path: str, *, seq_len: int = 0, micro_batch: int = 1, eval_batches: int = 0,
                   attention: str = "document", attn_implementation: str = "sdpa", device: str = "auto") -> dict[str, Any]:
    """`fusellm eval`: held-out CLM perplexity of a transformers folder on assembled blocks."""
    from fusellm_kernels.store.blocks import BlockStore

    # every option before the process group or the data: an error names the eval flag
    TrainConfig(model=model_path, data=data_path, output="-", seq_len=max(1, seq_len), micro_batch=micro_batch,
                global_batch=micro_batch, eval_batches=eval_batches, attention=attention,
                attn_implementation=attn_implementation, mode="clm", device=device).validate()
    d = init_distributed(device)
    try:
        blocks = BlockStore(data_path)
        cfg = TrainConfig(model=model_path, data=data_path, output="-", eval_data=data_path, seq_len=seq_len or blocks.block_len,
                          micro_batch=micro_batch, global_batch=micro_batch * d.world, eval_batches=eval_batches,
                          attention=attention, attn_implementation=attn_implementation, mode="clm").validate(d.world)
        data = open_data(cfg.data, cfg.eval_data, 0, seq_len=cfg.seq_len, model_vocab=1 << 62, fusion=False)
        assert data.eval_blocks is not None
        check_tokenizer(data.eval_blocks.store, model_path)
        param_dtype = torch.bfloat16 if d.device.type == "cuda" else torch.float32
        model = build_model(model_path, d, loss_options=dict(strategy="weights", lam=1.0, reduction="sum", return_parts=True),
                            attn_implementation=attn_implementation, attention=attention, param_dtype=param_dtype,
                            activation_checkpointing=False)
        t0 = time.perf_counter()
        loss, tokens = evaluate(model, data, cfg, d, torch.zeros(1, device=d.device))
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)), "blocks": len(data.eval_range), "tokens": tokens,
                "seconds": time.perf_counter() - t0}
    finally:
        close_distributed(d)


def _progress(enabled: bool, start: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


def _read_json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    import argparse

    from fusellm_kernels.training.config import add_arguments, from_args

    parser = argparse.ArgumentParser(prog="python -m fusellm_kernels.training.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    summary = train(from_args(parser.parse_args(argv)))
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
