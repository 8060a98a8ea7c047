"""The chunked PyTorch path: the same semantics as `ops/`, for CPU tensors (and `backend="torch"`)."""
