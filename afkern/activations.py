"""The adapters' activations: ``afkern.ops.activations`` (math lives in ``afkern.ops``, below the
kernels, which may import nothing above it); this name stays for the code that imports it here."""

from .ops.activations import (ACTIVATIONS, KERNEL_ACTIVATIONS, activation_code, activation_fn,  # noqa: F401
                              activation_grad, canonical_activation)

__all__ = ["ACTIVATIONS", "KERNEL_ACTIVATIONS", "activation_fn", "activation_code", "activation_grad",
           "canonical_activation"]
