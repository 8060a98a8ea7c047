"""Smoke test of the teacher-pass benchmark on CPU: records, schema and the correctness check
(it checks the plumbing, not speed)."""
from __future__ import annotations

import json
from pathlib import Path

from bench import bench_teacher_pass
from bench.common import RECORD_FIELDS, read_jsonl


def test_smoke_run_writes_checked_records(tmp_path: Path) -> None:
    assert bench_teacher_pass.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)]) == 0
    path = tmp_path / "teacher_pass.jsonl"
    assert all(set(json.loads(line)) == set(RECORD_FIELDS) for line in path.read_text().splitlines())
    records = {r.provider: r for r in read_jsonl(path)}
    assert set(records) == set(bench_teacher_pass.PROVIDERS)
    tokens = {r.shape["tokens"] for r in records.values()}
    assert len(tokens) == 1  # every provider is credited the same real tokens
    for name, r in records.items():
        assert r.op == "teacher_pass" and r.median_ms > 0 and r.extra["tokens_per_s"] > 0
        assert r.flops == 2 * r.extra["params"] * r.shape["tokens"]
        if name != "reference_loop":
            assert r.extra["max_rel_diff_vs_reference_loop"] <= 2**-9  # checked before it was recorded
    ref = records["reference_loop"].extra["bytes_per_token"]
    assert records["fusellm_compact"].extra["bytes_per_token"] < records["fusellm_lossless"].extra["bytes_per_token"] < ref
