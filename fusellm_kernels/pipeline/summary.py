"""The end-of-run summary every pipeline stage prints (and can write as one JSON line)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class RunSummary:
    """What one run of a stage did. tokens is None for stages that do not tokenise."""

    stage: str
    documents: int
    tokens: int | None
    bytes_written: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float | None:
        if self.tokens is None:
            return None
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "documents": self.documents,
            "tokens": self.tokens,
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 4),
            "tokens_per_s": None if self.tokens_per_s is None else round(self.tokens_per_s, 2),
            **{k.replace(" ", "_"): v for k, v in self.extra.items()},
        }

    def format(self) -> str:
        rows: list[tuple[str, str]] = [("documents", f"{self.documents:,}")]
        if self.tokens is not None:
            rows.append(("tokens", f"{self.tokens:,}"))
            rows.append(("tokens/s", f"{self.tokens_per_s:,.1f}"))
        rows.append(("bytes written", f"{human_bytes(self.bytes_written)} ({self.bytes_written:,})"))
        for k, v in self.extra.items():
            text = f"{v:,.4g}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)
            rows.append((k, text))
        width = max(len(k) for k, _ in rows)
        return "\n".join([f"fusellm {self.stage}: done in {self.seconds:.1f} s"] + [f"  {k:<{width}}  {v}" for k, v in rows])

    def write_json_line(self, path: str) -> None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(self.to_json()) + "\n")
