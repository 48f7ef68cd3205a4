"""Functional ops of afkern: the reference formulation, the re-associated torch fast path
and the fusion row op that the Triton and CUDA kernels implement."""
