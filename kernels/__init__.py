"""Triton kernels of afkern (installed as ``afkern.kernels``)."""
