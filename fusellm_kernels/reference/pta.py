"""Readable float64 references for probabilistic token alignment (`fusellm_kernels.align.pta`).

`sinkhorn_reference` is one problem's plain Sinkhorn in float64; `transform_step_logits_ot`
re-states, row by row in plain Python, what the PTA-LLM authors' `transform_step_logits_ot`
does (written from its behaviour, see `align/pta.py` for the list of its choices), and with
`authors=False` the semantics `fusellm align --method pta` uses by default. Slow on purpose;
tests compare the fast path with them.
"""
from __future__ import annotations

import math
from typing import Callable, Literal, Mapping, Sequence

import editdistance
import numpy as np

from fusellm_kernels.reference.alignment import reference_alignment


def sinkhorn_reference(
    cost: np.ndarray, a: np.ndarray, b: np.ndarray, *, lam: float = 30.0, tol: float = 1e-5,
    max_iter: int | None = 1000, stop: Literal["marginal", "authors"] = "marginal",
) -> tuple[np.ndarray, float, int]:
    """The entropic OT plan of one problem by Sinkhorn in float64: (plan [n, m], row marginal
    error, iterations).

    The plan starts as K / ΣK with K = exp(−λ·cost); each iteration scales the rows to `a`,
    then the columns to `b`. stop="marginal" ends when max_p |Σ_q P_pq − a_p| ≤ tol (this
    library's rule; at most max_iter iterations); stop="authors" is the PTA authors' loop: it
    ends when the row sums moved by at most tol since the previous iteration, clamps row and
    column sums below 1e-10 to 1e-10 before dividing, and has no cap (max_iter=None).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    plan = np.exp(-lam * np.asarray(cost, dtype=np.float64))
    plan /= plan.sum()
    previous = np.zeros(plan.shape[0])
    iterations = 0
    while True:
        if stop == "marginal":
            if iterations > 0 and np.abs(plan.sum(1) - a).max() <= tol:
                break
        elif np.abs(previous - plan.sum(1)).max() <= tol:
            break
        if max_iter is not None and iterations >= max_iter:
            break
        rows = plan.sum(1)
        previous = rows.copy()
        if stop == "authors":
            rows[rows < 1e-10] = 1e-10
        plan *= (a / rows)[:, None]
        cols = plan.sum(0)
        if stop == "authors":
            cols[cols < 1e-10] = 1e-10
        plan *= (b / cols)[None, :]
        iterations += 1
    return plan, float(np.abs(plan.sum(1) - a).max()), iterations


def _softmax(x: Sequence[float]) -> np.ndarray:
    z = np.asarray(x, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def transform_step_logits_ot(
    base_tokens: Sequence[str],
    blending_tokens: Sequence[str],
    base_vocab: Mapping[str, int],
    blending_per_step_logits: Sequence[Sequence[float]],
    blending_per_step_indices: Sequence[Sequence[int]],
    blending_id_to_token: Callable[[int], str],
    base_per_step_logits: Sequence[Sequence[float]],
    base_per_step_indices: Sequence[Sequence[int]],
    base_id_to_token: Callable[[int], str],
    *,
    blending_marker: str,
    base_marker: str,
    vocab_align_type: Literal["hard", "soft"] = "soft",
    blending_to_base_mapping: Mapping[str, str] | None = None,
    logits_number: int = 10,
    lam: float = 30.0,
    epsilon: float = 1e-5,
    authors: bool = True,
    fallback: Literal["current", "next"] = "current",
    max_iter: int = 1000,
) -> tuple[list[list[float]], list[list[int]]]:
    """Per base (target) row, the aligned teacher from one blending (source) model: (values,
    ids) lists per row, as the authors' function returns them.

    Inputs as `reference.alignment.transform_step_logits`, plus the base model's own per-step
    top-k (base_per_step_logits / _indices, base_id_to_token). With authors=True (their
    code): a row whose single DTW partner agrees gets MinED's remapped top-k; with the soft
    map, when that list has logits_number distinct ids and the base top-k as many, it is
    replaced by the transport rows: cost = edit distance of the mapped string without the
    blending marker and the base string without the base marker; masses = softmax over all
    logits, first logits_number; Sinkhorn with the authors' stopping rule; per blending entry
    the argmax column and its plan value, summed per base id; values = those sums. Other
    rows: the one-hot (value 1.0) on the fallback token.
    authors=False (this library's default): every agreeing row is transported; blending
    entries = the first logits_number with a base id (hard: the string itself, soft: the
    mapped string), masses softmax over them; the base side likewise; cost = edit distance
    of the two base strings as they are; Sinkhorn to a row marginal error ≤ epsilon (at most
    max_iter); values = log(m / Σ m). A row with no mapped entry has no teacher ([]).
    """
    mapping = blending_to_base_mapping or {}
    if vocab_align_type == "soft" and blending_to_base_mapping is None:
        raise ValueError("vocab_align_type='soft' needs blending_to_base_mapping")

    def to_base(index: int) -> str | None:
        token = blending_id_to_token(index).replace(blending_marker, base_marker)
        if vocab_align_type == "soft":
            token = mapping.get(token)
        return token if token is not None and token in base_vocab else None

    base_to_blending = reference_alignment(blending_tokens, base_tokens, source_marker=blending_marker,
                                           target_marker=base_marker)
    out_values: list[list[float]] = []
    out_ids: list[list[int]] = []
    for i, positions in enumerate(base_to_blending):
        base_token = base_tokens[i]
        aligned = False
        if len(positions) == 1:
            j = positions[0]
            blending_token = blending_tokens[j].replace(blending_marker, base_marker)
            aligned = base_token == blending_token or (
                vocab_align_type == "soft" and mapping.get(blending_token) == base_token)
        if not aligned:
            if fallback == "current":
                out_ids.append([base_vocab[base_token]])
                out_values.append([1.0])
            elif i + 1 < len(base_tokens):
                out_ids.append([base_vocab[base_tokens[i + 1]]])
                out_values.append([1.0])
            else:
                out_ids.append([])
                out_values.append([])
            continue
        k = logits_number
        base_ids = list(base_per_step_indices[i])
        if authors:
            ids: list[int] = []
            values: list[float] = []
            for logit, index in zip(blending_per_step_logits[j], blending_per_step_indices[j]):
                token = to_base(index)
                if token is not None and base_vocab[token] not in ids:
                    ids.append(base_vocab[token])
                    values.append(logit)
            if vocab_align_type == "soft" and len(ids) >= k and len(base_ids) >= k:
                r = _softmax(blending_per_step_logits[j])[:k]
                c = _softmax(base_per_step_logits[i])[:k]
                cost = np.array([[editdistance.eval(base_id_to_token(ids[p]).replace(blending_marker, ""),
                                                    base_id_to_token(base_ids[q]).replace(base_marker, ""))
                                  for q in range(k)] for p in range(k)], dtype=np.float64)
                plan, _, _ = sinkhorn_reference(cost, r, c, lam=lam, tol=epsilon, max_iter=None, stop="authors")
                merged: dict[int, float] = {}
                for p in range(k):
                    q = int(np.argmax(plan[p]))
                    merged[base_ids[q]] = merged.get(base_ids[q], 0.0) + float(plan[p, q])
                if not any(math.isnan(v) or v < 0 for v in merged.values()):
                    ids, values = list(merged), list(merged.values())
            out_ids.append(ids)
            out_values.append(values)
            continue
        kept = [(to_base(index), logit) for logit, index in
                zip(blending_per_step_logits[j][:k], blending_per_step_indices[j][:k])]
        kept = [(base_vocab[t], logit) for t, logit in kept if t is not None]
        if not kept:
            out_ids.append([])
            out_values.append([])
            continue
        a = _softmax([logit for _, logit in kept])
        base_ids = base_ids[:k]
        c = _softmax(base_per_step_logits[i][:k])
        cost = np.array([[editdistance.eval(base_id_to_token(p), base_id_to_token(q)) for q in base_ids]
                         for p, _ in kept], dtype=np.float64)
        plan, _, _ = sinkhorn_reference(cost, a, c, lam=lam, tol=epsilon, max_iter=max_iter)
        mass = np.zeros(len(base_ids))
        for p in range(len(kept)):
            q = int(np.argmax(plan[p]))
            mass[q] += plan[p, q]
        chosen = [q for q in range(len(base_ids)) if mass[q] > 0]
        total = mass[chosen].sum()
        out_ids.append([base_ids[q] for q in chosen])
        out_values.append([math.log(mass[q] / total) for q in chosen])
    return out_values, out_ids
