"""Fusion loss on given logits: Triton kernels → launchers → custom ops with autograd.

Notation for one row (z ∈ R^V the student logits, q = softmax(z), lse = log Σ_v exp z_v):
  candidate s, slot j: id_sj, x_sj = teacher_logit_sj / T over the slots that hold a valid id
      for the first time in the row (id in [0, V)); p_sj = softmax_j(x_sj)
  weights w_s (per row, from the CE strategy); A = {s : candidate s has a slot left}
  P_e = w_s p_sj / Σ_{s∈A} w_s for each entry e = (s, j); the fused teacher at id v is
      P_v = Σ_{e : id_e = v} P_e (the same id may come from several candidates)
  CE   = lse − z_label
  D    = Σ_e P_e (lse − z_{id_e})                    (soft_ce = −Σ_v P_v log q_v)
       + Σ_e P_e log P_{id_e}                         (kl adds Σ_v P_v log P_v)
  loss row ℓ = a·CE + b·D, with a = ce_coef·[label ≠ ignore] and
      b = f_coef·[fusion_mask and Σ_{s∈A} w_s > 0]; the launcher's caller folds λ, 1 − λ and
      the mean's 1/count into ce_coef and f_coef (device scalars: no host sync).
      A label outside [0, V) that is not ignore makes CE and a NaN: the row's loss and whole
      gradient are NaN.
Gradient (both divergences, since Σ_v P_v = 1):
  ∂ℓ/∂z_v = (a + b)·q_v − a·[v = label] − b·P_v

Bucketed tail (TAIL, `teacher_tail="bucket"`; the README's "The top-k tail"). Candidate s
brings its full-vocabulary lse_s: p_s(u) = Σ_{j: id_sj = u} exp(x_sj − lse_s) over every valid
slot (duplicates summed), tail t_s = max(0, 1 − Σ_u p_s(u)), c_s = Σ_u p_s(u) + t_s (1 unless
16-bit logits overshoot); I_s its ids, Q_s = Σ_{v∉I_s} q_v, w̄_s = w_s / Σ_{s∈A} w_s. A NaN
lse_s (a one-hot fallback) renormalises the candidate's slots among themselves: t_s = 0.
  D = Σ_s w̄_s [Σ_u p_s(u)(lse − z_u) − t_s log Q_s]                      (soft_ce)
      + Σ_s w̄_s [Σ_u p_s(u) log p_s(u) + t_s log t_s]                     (kl)
With ∂ log Q_s/∂z_v = [v∉I_s]·q_v/Q_s − q_v and r_s = w̄_s t_s / Q_s:
  ∂D/∂z_v = β_v·q_v − P_v,  P_v = Σ_s w̄_s p_s(v),  β_v = Σ_s w̄_s c_s − Σ_{s: v∉I_s} r_s
so the dense part is (a + b·β)·q with β = Σ_s w̄_s c_s − Σ_s r_s (v in no I_s), and each entry
id is written with its own β_v, summed over the s that miss it — never as the dense value plus
a correction, which cancels catastrophically when some Q_s is small (r_s ≫ 1).
Q_s is accumulated in pass 1 without 1 − Σ: per block, Σ exp(z − m) in float64 minus, in
float64, the same fp32 terms at the block's ids of I_s (bit-identical values), so it keeps
its digits down to Q_s ≈ 1e-12; the forward saves log Q_s [S, N] for the backward.

The forward kernel reads a row twice: pass 1 finds lse online, pass 2 walks the row backwards
(the most recently read blocks are still in L2) and writes (a + b)·q; after a barrier the
≤ S·K + 1 sparse positions are rewritten with their corrections. The gradient is thus
computed in the forward for an upstream gradient of 1; the backward multiplies rows whose
upstream gradient is not exactly 1 (a device-side test, so `loss.backward()` costs no pass
over the logits and no host sync). Memory: the gradient [N, V] in the logits' dtype (or the
logits themselves with inplace_backward) and O(N·S) floats; never an fp32 [N, V] buffer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fusellm_kernels.ops._numerics import needs_rne_bf16, to_stored_dtype
from fusellm_kernels.ops.launch_config import device_spec, fusion_loss_launch, scale_rows_launch
from fusellm_kernels.validation import second_backward_error


@triton.jit
def _fusion_loss_kernel(
    logits_ptr, labels_ptr, ids_ptr, tlog_ptr, w_ptr, fmask_ptr, ce_coef_ptr, f_coef_ptr, up_ptr,
    row_loss_ptr, ce_row_ptr, d_row_ptr, lse_ptr, grad_ptr, scratch_id_ptr, scratch_p_ptr, tlse_ptr, logq_out_ptr,
    stride_zn, stride_ln, stride_is, stride_in, stride_ik, stride_ts, stride_tn, stride_tk,
    stride_ws, stride_wn, stride_up, stride_gn, stride_lse_s, stride_lse_n, stride_q_s, stride_q_n,
    N, V, S, K,
    inv_temperature, ignore_index,
    BLOCK_V: tl.constexpr, S_P: tl.constexpr, K_P: tl.constexpr,
    KL: tl.constexpr, WRITE_GRAD: tl.constexpr, BACKWARD: tl.constexpr, HAS_UP: tl.constexpr,
    RNE_BF16: tl.constexpr, TAIL: tl.constexpr,
):
    # Persistent programs: program p takes rows p, p + P, ... (P = the grid), so the number of
    # rows in flight, and with it the L2 footprint of pass 2, is the launcher's choice.
    for r in range(tl.program_id(0), N, tl.num_programs(0)):
        row = tl.cast(r, tl.int64)  # int64 offsets: N·V can exceed 2**31
        if BACKWARD:
            # Rows whose upstream gradient is exactly 1 keep the gradient the forward wrote;
            # the others are recomputed from the logits with the upstream folded in (one rounding).
            up = tl.load(up_ptr + row * stride_up).to(tl.float32)
            todo = up != 1.0
        elif HAS_UP:
            up = tl.load(up_ptr + row * stride_up).to(tl.float32)  # a known upstream, folded in
            todo = row >= 0
        else:
            up = 1.0
            todo = row >= 0
        if todo:
            z_row = logits_ptr + row * stride_zn
            label = tl.load(labels_ptr + row * stride_ln)
            ce_on = label != ignore_index
            label_ok = ce_on & (label >= 0) & (label < V)

            # ---- the candidates' sparse distributions: entries e = s·K_P + j, as [E] and [S_P, K_P] ----
            E: tl.constexpr = S_P * K_P
            e_idx = tl.arange(0, E)
            e_s = e_idx // K_P
            e_k = e_idx % K_P
            slot_ok = (e_s < S) & (e_k < K)
            e_raw = tl.load(ids_ptr + e_s * stride_is + row * stride_in + e_k * stride_ik, mask=slot_ok, other=-1).to(tl.int32)
            e_valid = slot_ok & (e_raw >= 0) & (e_raw < V)
            e_raw = tl.where(e_valid, e_raw, -1)
            # Duplicates by a loop over the entries through this program's scratch row, so every
            # value stays an [E] vector: [E, E] comparison tiles cost 40+ registers per thread at
            # E = 64. An entry repeats an id held by an earlier entry of its own candidate (it is
            # dropped: the first slot wins; with TAIL its mass is kept) or of any candidate (it
            # does not write the gradient).
            scr_id = scratch_id_ptr + tl.program_id(0) * E
            scr_p = scratch_p_ptr + tl.program_id(0) * E
            tl.debug_barrier()  # the previous row's reads of the scratch row are done
            tl.store(scr_id + e_idx, e_raw)
            tl.debug_barrier()  # every entry is visible to every thread
            n_same = tl.zeros([E], dtype=tl.int32)  # earlier entries of the same candidate with this id
            n_any = tl.zeros([E], dtype=tl.int32)  # earlier entries of any candidate with this id
            member = tl.zeros([E], dtype=tl.int32)  # TAIL: bit s set when the entry's id is in I_s
            for j in range(0, S * K_P):
                same = e_valid & (e_raw == tl.load(scr_id + j))
                hit = same & (e_idx > j)
                n_same += (hit & (e_s == j // K_P)).to(tl.int32)
                n_any += hit.to(tl.int32)
                if TAIL:
                    member = member | tl.where(same, 1 << (j // K_P), 0)
            e_keep = e_valid & (n_same == 0)
            first = e_valid & (n_any == 0)
            e_ids = tl.where(e_keep, e_raw, -1)
            # the slots that carry mass: every valid one with TAIL (duplicates summed), else the first
            e_mass = e_valid if TAIL else e_keep

            keep = tl.reshape(e_keep, [S_P, K_P])
            s_idx = tl.arange(0, S_P)
            x = tl.load(tlog_ptr + e_s * stride_ts + row * stride_tn + e_k * stride_tk,
                        mask=e_mass, other=0.0).to(tl.float32) * inv_temperature
            x = tl.reshape(tl.where(e_mass, x, float("-inf")), [S_P, K_P])
            has_s = tl.sum(keep.to(tl.int32), axis=1) > 0
            x_max = tl.where(has_s, tl.max(x, axis=1), 0.0)
            ex = tl.exp(x - x_max[:, None])  # 0 at empty slots
            if TAIL:
                t_lse = tl.load(tlse_ptr + s_idx * stride_lse_s + row * stride_lse_n, mask=s_idx < S, other=0.0)
                renorm = t_lse != t_lse  # NaN: no lse for this row (a one-hot fallback)
                own = x_max + tl.log(tl.where(has_s, tl.sum(ex, axis=1), 1.0))
                p = tl.exp(x - tl.where(renorm, own, t_lse)[:, None])
                p_sum = tl.sum(p, axis=1)
                tail = tl.where(has_s & (renorm == 0), tl.maximum(1.0 - p_sum, 0.0), 0.0)
            else:
                p = ex / tl.where(has_s, tl.sum(ex, axis=1), 1.0)[:, None]
            w = tl.load(w_ptr + s_idx * stride_ws + row * stride_wn, mask=s_idx < S, other=0.0).to(tl.float32)
            w = tl.where(has_s, w, 0.0)
            w_total = tl.sum(w, axis=0)
            fmask = tl.load(fmask_ptr + row) != 0
            has_f = fmask & (w_total > 0)
            w_bar = w / tl.where(w_total > 0, w_total, 1.0)
            e_P = tl.reshape(w_bar[:, None] * p, [E])

            # P at each entry's id, summed over the candidates (and with TAIL the slots) that hold it
            tl.store(scr_p + e_idx, e_P)
            tl.debug_barrier()
            merged = tl.zeros([E], dtype=tl.float32)
            merged_same = tl.zeros([E], dtype=tl.float32)  # TAIL and KL: w̄_s·p_s(id) of the entry's own s
            for j in range(0, S * K_P):
                on = e_keep & (e_ids == tl.load(scr_id + j))
                p_j = tl.load(scr_p + j)
                merged += tl.where(on, p_j, 0.0)
                if TAIL and KL:
                    merged_same += tl.where(on & (e_s == j // K_P), p_j, 0.0)
            # kl's teacher entropy needs no logits: summed now, so fewer vectors live through the passes
            entropy = 0.0
            if KL and not BACKWARD:
                if TAIL:
                    w_e = tl.reshape(tl.broadcast_to(w_bar[:, None], [S_P, K_P]), [E])
                    ent = e_keep & (merged_same > 0)
                    entropy = tl.sum(tl.where(ent, merged_same * tl.log(tl.where(ent, merged_same, 1.0) / tl.where(ent, w_e, 1.0)), 0.0), axis=0)
                    entropy += tl.sum(tl.where(tail > 0.0, w_bar * tail * tl.log(tl.where(tail > 0.0, tail, 1.0)), 0.0), axis=0)
                else:
                    entropy = tl.sum(tl.where(e_keep & (e_P > 0), e_P * tl.log(tl.where(e_P > 0, merged, 1.0)), 0.0), axis=0)

            v_off = tl.arange(0, BLOCK_V)
            # gathered before pass 1 (TAIL reads them there) and pass 2 (which may overwrite the logits)
            z_label = tl.load(z_row + label, mask=label_ok, other=0.0).to(tl.float32)
            e_z = tl.load(z_row + tl.where(e_mass, e_raw, 0), mask=e_mass, other=0.0).to(tl.float32)
            a = tl.where(ce_on, tl.load(ce_coef_ptr).to(tl.float32), 0.0)
            # a label outside [0, V) (not ignore_index): NaN in a spreads to the row's loss and
            # every entry of its gradient, visible with no host sync (validate=True names it)
            a = tl.where(ce_on & (label_ok == 0), float("nan"), a)
            b = tl.where(has_f, tl.load(f_coef_ptr).to(tl.float32), 0.0)
            # Everything that does not need lse (or Q_s) is reduced now, so that few [E] vectors
            # stay live through the two passes (the register budget): the loss's teacher side
            # relative to the largest entry logit z_ref (D = P_tot·(lse − z_ref) + d_pre, no
            # cancellation of large logits) and the gradient's sparse coefficients.
            z_ref = tl.max(tl.where(e_mass, e_z, float("-inf")), axis=0)
            z_ref = tl.where(z_ref > float("-inf"), z_ref, 0.0)
            p_tot = tl.sum(tl.where(e_mass, e_P, 0.0), axis=0)
            d_pre = entropy - tl.sum(tl.where(e_mass, e_P * (e_z - z_ref), 0.0), axis=0)
            label_in_teacher = tl.sum((e_keep & (e_ids == label)).to(tl.int32), axis=0) > 0
            a_up = a * up
            b_up = b * up
            e_coef = b_up * merged + tl.where(e_ids == label, a_up, 0.0)
            if TAIL:
                wt = w_bar * tail  # w̄_s·t_s
                w_mass = tl.sum(w_bar * (p_sum + tail), axis=0)
            if BACKWARD:
                lse = tl.load(lse_ptr + row)
                if TAIL:
                    log_q_out = tl.load(logq_out_ptr + s_idx * stride_q_s + row * stride_q_n, mask=s_idx < S, other=0.0)
            else:
                # ---- pass 1: lse = log Σ exp z, online over blocks of the row (TAIL: and Q_s) ----
                m = float("-inf")
                acc = 0.0
                out_acc = tl.zeros([S_P], dtype=tl.float32)  # Σ_{v∉I_s} exp(z_v − m)
                for v0 in range(0, V, BLOCK_V):
                    cols = v0 + v_off
                    z = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
                    m_new = tl.maximum(m, tl.max(z, axis=0))
                    ez = tl.exp(z - m_new)
                    acc = acc * tl.exp(m - m_new) + tl.sum(ez, axis=0)
                    if TAIL:
                        in_blk = e_keep & (e_raw >= v0) & (e_raw < v0 + BLOCK_V)
                        e_ex = tl.where(in_blk, tl.exp(e_z - m_new), 0.0).to(tl.float64)
                        in_s = tl.sum(tl.reshape(e_ex, [S_P, K_P]), axis=1)
                        out_blk = tl.sum(ez.to(tl.float64), axis=0) - in_s
                        out_acc = out_acc * tl.exp(m - m_new) + tl.maximum(out_blk, 0.0).to(tl.float32)
                    m = m_new
                lse = m + tl.log(acc)
                tl.store(lse_ptr + row, lse)
                if TAIL:
                    log_q_out = tl.log(out_acc) - tl.log(acc)
                    if WRITE_GRAD:
                        tl.store(logq_out_ptr + s_idx * stride_q_s + row * stride_q_n, log_q_out, mask=s_idx < S)

            if TAIL:
                ratio = tl.where(wt > 0.0, wt * tl.exp(-log_q_out), 0.0)  # r_s = w̄_s t_s / Q_s
                beta = w_mass - tl.sum(ratio, axis=0)
                # each entry's own β: the r_s of the candidates whose ids miss it, summed directly
                miss = ((member[:, None] >> s_idx[None, :]) & 1) == 0
                e_beta = w_mass - tl.sum(tl.where(miss, ratio[None, :], 0.0), axis=1)
            else:
                beta = 1.0
                e_beta = tl.full([E], 1.0, dtype=tl.float32)
            if not BACKWARD:
                # ---- loss terms ----
                ce = tl.where(ce_on, lse - z_label, 0.0)
                ce = tl.where(ce_on & (label_ok == 0), float("nan"), ce)
                d = p_tot * (lse - z_ref) + d_pre
                if TAIL:
                    d -= tl.sum(tl.where(wt > 0.0, wt * log_q_out, 0.0), axis=0)
                d = tl.where(has_f, d, 0.0)
                tl.store(ce_row_ptr + row, ce)
                tl.store(d_row_ptr + row, d)
                tl.store(row_loss_ptr + row, a * ce + b * d)

            if WRITE_GRAD:
                c = a_up + b_up * beta
                g_row = grad_ptr + row * stride_gn
                # ---- pass 2, backwards: the dense part (a + b·β)·q ----
                n_blocks = tl.cdiv(V, BLOCK_V)
                for i in range(0, n_blocks):
                    cols = (n_blocks - 1 - i) * BLOCK_V + v_off
                    z = tl.load(z_row + cols, mask=cols < V, other=0.0).to(tl.float32)
                    tl.store(g_row + cols, to_stored_dtype(c * tl.exp(z - lse), grad_ptr, RNE_BF16), mask=cols < V)
                # The sparse rewrites below must land after every thread's dense stores.
                tl.debug_barrier()
                # ---- the sparse positions, duplicates merged so each is written once ----
                e_grad = (a_up + b_up * e_beta) * tl.exp(e_z - lse) - e_coef
                tl.store(g_row + e_ids, to_stored_dtype(e_grad, grad_ptr, RNE_BF16), mask=first)
                g_label = c * tl.exp(z_label - lse) - a_up
                tl.store(g_row + label, to_stored_dtype(g_label, grad_ptr, RNE_BF16), mask=label_ok & (label_in_teacher == 0))


@triton.jit
def _scale_rows_kernel(grad_ptr, gout_ptr, stride_gn, stride_o, V, BLOCK_V: tl.constexpr, RNE_BF16: tl.constexpr):
    """grad[n, :] *= gout[n], skipped when gout[n] == 1 (the usual `loss.backward()`)."""
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(gout_ptr + row * stride_o).to(tl.float32)
    if scale != 1.0:
        g_row = grad_ptr + row * stride_gn
        v_off = tl.arange(0, BLOCK_V)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + v_off
            g = tl.load(g_row + cols, mask=cols < V, other=0.0).to(tl.float32)
            tl.store(g_row + cols, to_stored_dtype(g * scale, grad_ptr, RNE_BF16), mask=cols < V)


def _launch(
    logits: Tensor, labels: Tensor, teacher_ids: Tensor, teacher_logits: Tensor, weights: Tensor, fusion_mask: Tensor,
    ce_coef: Tensor, f_coef: Tensor, lse: Tensor, grad: Tensor | None, upstream: Tensor | None,
    rows: tuple[Tensor, Tensor, Tensor] | None, *, temperature: float, kl: bool, ignore_index: int, backward: bool,
    teacher_lse: Tensor | None = None, log_q_out: Tensor | None = None,
) -> None:
    n, v = logits.shape
    if n == 0:
        return
    s, _, k = teacher_ids.shape
    # Triton vectorises a row's loads and stores when its base is 16-byte aligned and its stride a multiple of 16
    aligned = all(t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0 for t in (logits, grad) if t is not None)
    cfg = fusion_loss_launch(n, v, device_spec(logits.device), elem_bytes=logits.element_size(), row_aligned=aligned,
                             tail=teacher_lse is not None)
    out = grad if grad is not None else logits  # not written unless WRITE_GRAD
    up = upstream if upstream is not None else lse  # not read unless BACKWARD
    row_loss, ce_row, d_row = rows if rows is not None else (lse, lse, lse)  # not written in BACKWARD
    e = triton.next_power_of_2(s) * triton.next_power_of_2(k)
    scratch_id = torch.empty(cfg.grid, e, dtype=torch.int32, device=logits.device)  # one row per program
    scratch_p = torch.empty(cfg.grid, e, dtype=torch.float32, device=logits.device)
    tail = teacher_lse is not None
    tlse = teacher_lse if tail else weights  # not read without TAIL
    logq = log_q_out if log_q_out is not None else tlse  # written (TAIL and a gradient) or read (BACKWARD)
    _fusion_loss_kernel[(cfg.grid,)](
        logits, labels, teacher_ids, teacher_logits, weights, fusion_mask, ce_coef, f_coef, up,
        row_loss, ce_row, d_row, lse, out, scratch_id, scratch_p, tlse, logq,
        logits.stride(0), labels.stride(0),
        teacher_ids.stride(0), teacher_ids.stride(1), teacher_ids.stride(2),
        teacher_logits.stride(0), teacher_logits.stride(1), teacher_logits.stride(2),
        weights.stride(0), weights.stride(1), up.stride(0), out.stride(0), tlse.stride(0), tlse.stride(1),
        logq.stride(0), logq.stride(1),
        n, v, s, k,
        1.0 / temperature, ignore_index,
        BLOCK_V=cfg.block, S_P=triton.next_power_of_2(s), K_P=triton.next_power_of_2(k),
        KL=kl, WRITE_GRAD=grad is not None, BACKWARD=backward, HAS_UP=upstream is not None and not backward,
        RNE_BF16=needs_rne_bf16(out), TAIL=tail,
        num_warps=cfg.num_warps, maxnreg=cfg.maxnreg,
    )


def fusion_loss_forward(
    logits: Tensor,
    labels: Tensor,
    teacher_ids: Tensor,
    teacher_logits: Tensor,
    weights: Tensor,
    fusion_mask: Tensor,
    ce_coef: Tensor,
    f_coef: Tensor,
    *,
    temperature: float,
    kl: bool,
    ignore_index: int,
    grad: Tensor | None,
    upstream: Tensor | None = None,
    teacher_lse: Tensor | None = None,
    log_q_out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Row losses and, when `grad` is given, the gradient for the upstream gradient [N] of the
    row losses (`upstream`, float32; None means 1 everywhere).

    teacher_lse [S, N] float32 selects the bucketed tail (temperature must be 1); with a
    gradient, log Q_s is written into `log_q_out` (float32 [S, N]) for the backward.

    logits [N, V] bf16/fp16/fp32 with unit stride along V; labels [N] int; teacher_ids and
    teacher_logits [S, N, K] (any strides); weights [S, N] float; fusion_mask [N] uint8;
    ce_coef, f_coef float32 scalars on the device; grad [N, V] with unit stride along V (it
    may be `logits` itself). Returns row_loss, ce_row, d_row, lse, each float32 [N].
    `launch_config.persistent_programs` overrides how many programs per SM it launches.
    Peak extra memory: 16·N bytes (plus `grad`, owned by the caller).
    """
    n = logits.shape[0]
    row_loss, ce_row, d_row, lse = (torch.empty(n, dtype=torch.float32, device=logits.device) for _ in range(4))
    if teacher_lse is not None and grad is not None and log_q_out is None:
        log_q_out = torch.empty_like(teacher_lse)
    _launch(logits, labels, teacher_ids, teacher_logits, weights, fusion_mask, ce_coef, f_coef, lse, grad, upstream,
            (row_loss, ce_row, d_row), temperature=temperature, kl=kl, ignore_index=ignore_index, backward=False,
            teacher_lse=teacher_lse, log_q_out=log_q_out)
    return row_loss, ce_row, d_row, lse


def fusion_loss_backward_(
    grad: Tensor, upstream: Tensor, logits: Tensor, labels: Tensor, teacher_ids: Tensor, teacher_logits: Tensor,
    weights: Tensor, fusion_mask: Tensor, ce_coef: Tensor, f_coef: Tensor, lse: Tensor, *, temperature: float, ignore_index: int,
    teacher_lse: Tensor | None = None, log_q_out: Tensor | None = None,
) -> Tensor:
    """Finish the gradient written by `fusion_loss_forward` for the upstream gradient [N] of the
    row losses: rows with upstream exactly 1 are left alone, the others are recomputed from the
    logits and `lse` (one read, one write). In place on `grad`; no extra memory."""
    _launch(logits, labels, teacher_ids, teacher_logits, weights, fusion_mask, ce_coef, f_coef, lse, grad, upstream,
            None, temperature=temperature, kl=False, ignore_index=ignore_index, backward=True,
            teacher_lse=teacher_lse, log_q_out=log_q_out)
    return grad


def scale_rows_(grad: Tensor, grad_output: Tensor) -> Tensor:
    """grad [N, V] *= grad_output [N] row-wise, in place; rows scaled by exactly 1 are not touched.
    Used when the logits are gone (inplace_backward): the result is rounded twice."""
    n, v = grad.shape
    if n:
        cfg = scale_rows_launch(n, v, device_spec(grad.device), grad.element_size(),
                                grad.stride(0) % 16 == 0 and grad.data_ptr() % 16 == 0)
        _scale_rows_kernel[(cfg.grid,)](grad, grad_output, grad.stride(0), grad_output.stride(0), v,
                                        BLOCK_V=cfg.block, RNE_BF16=needs_rne_bf16(grad), num_warps=cfg.num_warps,
                                        maxnreg=cfg.maxnreg)
    return grad


# ---- custom ops: opaque to torch.compile, so the loss never breaks a compiled graph ----

@torch.library.custom_op("fusellm::fusion_loss_fwd", mutates_args=())
def fusion_loss_fwd_op(
    logits: Tensor,
    labels: Tensor,
    teacher_ids: Tensor,
    teacher_logits: Tensor,
    weights: Tensor,
    fusion_mask: Tensor,
    ce_coef: Tensor,
    f_coef: Tensor,
    temperature: float,
    kl: bool,
    ignore_index: int,
    compute_grad: bool,
    teacher_lse: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    log_q_out = torch.empty_like(teacher_lse) if teacher_lse is not None and compute_grad else _no_tensor(logits)
    outs = fusion_loss_forward(
        logits, labels, teacher_ids, teacher_logits, weights, fusion_mask, ce_coef, f_coef,
        temperature=temperature, kl=kl, ignore_index=ignore_index, grad=grad if compute_grad else None,
        teacher_lse=teacher_lse, log_q_out=log_q_out if log_q_out.numel() else None,
    )
    return (*outs, grad, log_q_out)


def _no_tensor(logits: Tensor) -> Tensor:
    return logits.new_empty(0, dtype=torch.float32)


@fusion_loss_fwd_op.register_fake
def _(logits, labels, teacher_ids, teacher_logits, weights, fusion_mask, ce_coef, f_coef, temperature, kl, ignore_index, compute_grad, teacher_lse=None):
    n = logits.shape[0]
    rows = [logits.new_empty(n, dtype=torch.float32) for _ in range(4)]
    log_q_out = torch.empty_like(teacher_lse) if teacher_lse is not None and compute_grad else _no_tensor(logits)
    return (*rows, torch.empty_like(logits) if compute_grad else logits.new_empty(0), log_q_out)


@torch.library.custom_op("fusellm::fusion_loss_bwd_", mutates_args=("grad",))
def fusion_loss_bwd_op(
    grad: Tensor, upstream: Tensor, logits: Tensor, labels: Tensor, teacher_ids: Tensor, teacher_logits: Tensor,
    weights: Tensor, fusion_mask: Tensor, ce_coef: Tensor, f_coef: Tensor, lse: Tensor, temperature: float, ignore_index: int,
    teacher_lse: Tensor | None = None, log_q_out: Tensor | None = None,
) -> None:
    fusion_loss_backward_(grad, upstream, logits, labels, teacher_ids, teacher_logits, weights, fusion_mask, ce_coef, f_coef,
                          lse, temperature=temperature, ignore_index=ignore_index, teacher_lse=teacher_lse, log_q_out=log_q_out)


@fusion_loss_bwd_op.register_fake
def _(grad, upstream, logits, labels, teacher_ids, teacher_logits, weights, fusion_mask, ce_coef, f_coef, lse, temperature, ignore_index,
      teacher_lse=None, log_q_out=None) -> None:
    return None


def _setup_context(ctx, inputs, output) -> None:
    logits, labels, teacher_ids, teacher_logits, weights, fusion_mask, ce_coef, f_coef, temperature, _, ignore_index, _, *tail = inputs
    teacher_lse = tail[0] if tail else None
    ctx.save_for_backward(output[4], logits, labels, teacher_ids, teacher_logits, weights, fusion_mask, ce_coef, f_coef, output[3],
                          teacher_lse, output[5] if teacher_lse is not None else None)
    ctx.options = (temperature, ignore_index)
    ctx.n_inputs = len(inputs)
    ctx.spent = False


def _backward(ctx, g_row_loss, g_ce, g_d, g_lse, g_grad, g_log_q):
    if ctx.spent:  # the gradient was made in the forward and finished in place: it is spent
        raise second_backward_error("fusion_loss")
    ctx.spent = True
    grad, *saved = ctx.saved_tensors
    temperature, ignore_index = ctx.options
    *saved, teacher_lse, log_q_out = saved
    torch.ops.fusellm.fusion_loss_bwd_(grad, g_row_loss, *saved, temperature, ignore_index, teacher_lse, log_q_out)
    return (grad,) + (None,) * (ctx.n_inputs - 1)


fusion_loss_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class InplaceFusionLossFunction(torch.autograd.Function):
    """Eager-only variant that writes the gradient over the logits (no extra [N, V] buffer).

    After the forward the logits tensor holds the gradient: it must not be read again. An
    upstream gradient other than 1 rescales the stored bf16/fp16 gradient (rounded twice).
    """

    @staticmethod
    def forward(ctx, logits, labels, teacher_ids, teacher_logits, weights, fusion_mask, ce_coef, f_coef, temperature, kl, ignore_index,
                teacher_lse=None):
        row_loss, ce_row, d_row, _ = fusion_loss_forward(
            logits, labels, teacher_ids, teacher_logits, weights, fusion_mask, ce_coef, f_coef,
            temperature=temperature, kl=kl, ignore_index=ignore_index, grad=logits, teacher_lse=teacher_lse,
        )
        ctx.save_for_backward(logits)
        ctx.spent = False
        ctx.mark_non_differentiable(ce_row, d_row)
        return row_loss, ce_row, d_row

    @staticmethod
    def backward(ctx, g_row_loss, g_ce, g_d):
        if ctx.spent:
            raise second_backward_error("fusion_loss(inplace_backward=True)")
        ctx.spent = True
        (grad,) = ctx.saved_tensors
        scale_rows_(grad, g_row_loss)
        return (grad,) + (None,) * 11
