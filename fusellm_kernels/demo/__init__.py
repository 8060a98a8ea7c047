"""The main job (`fusellm fuse`, `make fuse`): knowledge fusion end to end on a built-in default.

Not part of the library's pipeline proper: it makes its own corpus (the standard library's
docstrings), its own toy source and target models, then drives the real stages
(`fusellm prepare / teacher / align / assemble`, `training/`) and writes a report. It lives
in its own package so the pipeline stays free of demo-only code (toy-model pretraining,
the stdlib corpus, the report).
"""
from fusellm_kernels.demo.job import PRESETS, FuseConfig, FuseError, PretrainedSource, preset, run_fuse

__all__ = ["PRESETS", "FuseConfig", "FuseError", "PretrainedSource", "preset", "run_fuse"]
