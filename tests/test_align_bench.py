"""Smoke test of `bench.bench_alignment --quick`: records follow the schema and the fast
providers agree with the references (speed is not checked here)."""
from __future__ import annotations

import json

from bench import bench_alignment
from bench.common import RECORD_FIELDS, read_jsonl


def test_quick_alignment_bench(tmp_path):
    assert bench_alignment.main(["--quick", "--out", str(tmp_path)]) == 0
    path = tmp_path / "alignment.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines and all(set(line) == set(RECORD_FIELDS) for line in lines)
    records = read_jsonl(path)
    assert {(r.op, r.provider) for r in records} == {
        ("min_ed_alignment", "reference"), ("min_ed_alignment", "fast"),
        ("vocab_map_soft", "reference"), ("vocab_map_soft", "fast"),
        ("align_document", "minED"), ("align_document", "pta"),
    }
    for r in records:
        assert r.median_ms > 0 and r.card and r.extra["cpus"] >= 1
        if r.provider == "fast":
            assert r.extra["check_ok"] is True and r.extra["speedup_vs_reference"] > 0
    fast = next(r for r in records if r.op == "min_ed_alignment" and r.provider == "fast")
    assert fast.shape == {"tokens": 256, "documents": 2} and fast.extra["tokens_per_s"] > 0
    pta = next(r for r in records if r.op == "align_document" and r.provider == "pta")
    assert pta.extra["transported_rows"] > 0 and pta.extra["not_converged"] == 0 and pta.extra["tokens_per_s"] > 0
