"""The teacher gather (stored top-k + position map + vocab map → loss inputs), both backends,
against a plain per-row loop and against the original's `transform_step_logits`."""
from __future__ import annotations

import random

import pytest
import torch

from fusellm_kernels.functional import gather_teacher_rows
from fusellm_kernels.reference.alignment import reference_alignment, transform_step_logits


def _first_occurrences(ids: list[int], logits: list[float]) -> tuple[list[int], list[float]]:
    """What the loss sees of a row: valid ids, first slot of each id wins, in slot order."""
    seen: dict[int, float] = {}
    for i, x in zip(ids, logits):
        if i >= 0 and i not in seen:
            seen[i] = x
    return list(seen), list(seen.values())


def _random_tables(seed: int):
    g = torch.Generator().manual_seed(seed)
    v_src, v_tgt, n = 40, 30, 50
    tables_ids, tables_logits, maps = [], [], []
    for k in (5, 3):
        r = 20
        ids = torch.randint(0, v_src + 3, (r, k), generator=g)  # a few ids beyond the map's size
        ids[0, 1] = ids[0, 0]  # duplicate source ids
        tables_ids.append(ids.to(torch.int32))
        tables_logits.append(torch.randn(r, k, generator=g).sort(dim=1, descending=True).values)
        vmap = torch.randint(-1, v_tgt, (v_src,), generator=g).to(torch.int32)  # −1: unmapped
        vmap[1] = vmap[2] = 7  # two source ids onto one target id
        maps.append(vmap)
    maps[1] = None  # a candidate already in the target vocabulary (the target model itself)
    tables_ids[1] = tables_ids[1].clamp_max(v_tgt - 1)
    source_rows = torch.randint(-1, 20, (2, n), generator=g)
    fallback = torch.randint(-1, v_tgt, (2, n), generator=g).to(torch.int32)
    return tables_ids, tables_logits, source_rows, fallback, maps


def _expected(tables_ids, tables_logits, source_rows, fallback, maps, k_out):
    ids = torch.full((len(maps), source_rows.shape[1], k_out), -1, dtype=torch.int32)
    logits = torch.zeros(len(maps), source_rows.shape[1], k_out)
    for s, vmap in enumerate(maps):
        for n in range(source_rows.shape[1]):
            r = int(source_rows[s, n])
            if r >= 0:
                for j in range(tables_ids[s].shape[1]):
                    src = int(tables_ids[s][r, j])
                    ids[s, n, j] = src if vmap is None else (int(vmap[src]) if src < len(vmap) else -1)
                    logits[s, n, j] = tables_logits[s][r, j]
            elif int(fallback[s, n]) >= 0:
                ids[s, n, 0] = fallback[s, n]
                logits[s, n, 0] = 1.0
    return ids, logits


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gather_matches_a_plain_loop(backend):
    tables = _random_tables(0)
    ids, logits = gather_teacher_rows(*tables[:2], tables[2], tables[3], tables[4], backend=backend)
    exp_ids, exp_logits = _expected(*tables, k_out=5)
    assert ids.shape == (2, 50, 5) and ids.dtype == torch.int32
    assert torch.equal(ids, exp_ids)
    assert torch.equal(logits, exp_logits)


def test_gather_backends_agree_in_bf16():
    tables = _random_tables(1)
    a = gather_teacher_rows(*tables[:2], tables[2], tables[3], tables[4], k=8, logits_dtype=torch.bfloat16, backend="torch")
    b = gather_teacher_rows(*tables[:2], tables[2], tables[3], tables[4], k=8, logits_dtype=torch.bfloat16, backend="triton")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert bool((a[0][:, :, 5:] == -1).all())


@pytest.mark.parametrize("align_type", ["hard", "soft"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gather_reproduces_transform_step_logits(align_type, seed):
    """Position map by the original's rule (current-token fallback) + the gather = the seed's
    `transform_step_logits`, compared as what the loss sees (first occurrence of each id)."""
    rng = random.Random(seed)
    pieces = ["a", "b", "ab", "ba", "abc", "c", "ca", "bc"]
    target_vocab = ["▁" + p for p in pieces] + pieces
    source_vocab = ["Ġ" + p for p in pieces] + pieces + ["Ġzz", "q"]  # two tokens with no exact counterpart
    words = [rng.choice(pieces[:4]) + rng.choice(["", "c", "a"]) for _ in range(12)]

    def tokenize(marker: str, vocab: list[str], split_at: int) -> list[str]:
        out = []
        for w in words:
            first = marker + w[:split_at] if len(w) > split_at else marker + w
            out.append(first if first in vocab else marker + w[0])
            rest = w[len(out[-1]) - 1 :]
            out.extend(rest[i : i + 2] for i in range(0, len(rest), 2))
        return out

    target_tokens = tokenize("▁", target_vocab, 2)
    source_tokens = tokenize("Ġ", source_vocab, 1)
    tvocab = {t: i for i, t in enumerate(target_vocab)}
    k = 4
    top_ids = [[rng.randrange(len(source_vocab)) for _ in range(k)] for _ in source_tokens]
    top_logits = [sorted((rng.gauss(0, 2) for _ in range(k)), reverse=True) for _ in source_tokens]

    replaced = [t.replace("Ġ", "▁") for t in source_vocab]
    if align_type == "hard":
        mapping = None
        vmap = [tvocab.get(t, -1) for t in replaced]
    else:  # a soft map sending the marker-less twin or the first piece to a target token
        mapping = {t: (t if t in tvocab else ("▁ab" if t.startswith("▁") else "a")) for t in replaced}
        vmap = [tvocab[mapping[t]] for t in replaced]
    ref_logits, ref_ids = transform_step_logits(
        target_tokens, source_tokens, tvocab, top_logits, top_ids, source_vocab,
        blending_marker="Ġ", base_marker="▁", vocab_align_type=align_type, blending_to_base_mapping=mapping,
    )

    # position map by the original's rule, written out in the test
    alignment = reference_alignment(source_tokens, target_tokens, source_marker="Ġ", target_marker="▁")
    source_rows, fallback = [], []
    for i, js in enumerate(alignment):
        ok = False
        if len(js) == 1:
            s_tok = source_tokens[js[0]].replace("Ġ", "▁")
            ok = s_tok == target_tokens[i] or (mapping is not None and mapping.get(s_tok) == target_tokens[i])
        source_rows.append(js[0] if ok else -1)
        fallback.append(-1 if ok else tvocab[target_tokens[i]])

    ids, logits = gather_teacher_rows(
        [torch.tensor(top_ids, dtype=torch.int32)], [torch.tensor(top_logits)],
        torch.tensor([source_rows]), torch.tensor([fallback], dtype=torch.int32),
        [torch.tensor(vmap, dtype=torch.int32)], backend="torch",
    )
    for i in range(len(target_tokens)):
        got_ids, got_logits = _first_occurrences(ids[0, i].tolist(), logits[0, i].tolist())
        assert got_ids == ref_ids[i], (i, target_tokens[i])
        assert got_logits == pytest.approx(ref_logits[i], abs=1e-6)
