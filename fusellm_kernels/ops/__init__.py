"""Triton ops, one per file: kernel → launcher → custom op / autograd.

Importing this package imports triton; the functional API does so only when the Triton
backend is used.
"""
