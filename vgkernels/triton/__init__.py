"""Triton kernels for CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)."""
