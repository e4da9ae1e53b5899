"""Triton kernels (GPU; run on the CPU under TRITON_INTERPRET=1 for testing)."""
