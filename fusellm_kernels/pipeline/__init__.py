"""Pipeline stages: corpus preparation, teacher pass, CE scores (later: alignment, assembly).

Heavy libraries (transformers, datasets) are imported inside the functions that need them,
so importing this package stays as light as `fusellm_kernels.store`.
"""
