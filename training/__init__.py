"""FSDP2 knowledge-fusion training: `train.py` (the loop), `config.py` (typed configuration and
presets), `data.py` (blocks, teacher stores, sampler), `parallel.py` (process group, meta-device
model, FSDP2 sharding), `checkpoint.py` (DCP), `metrics.py` (log and curves), `synthetic.py`
(well-formed random stores and blocks for tests and benchmarks)."""
