"""What one timed call is: the inputs of a case and the call of each mode.

Inputs (float32 draws from a seeded generator, cast to the run's device and dtype): a token count
T runs as ``[B, S] = [T / seq_len, seq_len]`` (``[1, T]`` when T <= seq_len).

* block: ``hidden_states [B, S, I]`` (std 0.5; I = the site's input width, BERT: intermediate) and
  ``input_tensor [B, S, d]`` (std 1);
* model: ``inputs_embeds [B, S, d]`` (std 1);
* ``dy [B, S, d]``: the cotangent that every gradient mode back-propagates (std 1).

Modes, each a call ``prepare()`` builds untimed:

* ``forward`` (block) / ``inference`` (model): ``fn(*inputs)`` under ``torch.no_grad`` (afkern's
  folded inference path);
* ``backward`` (block): the backward alone, ``out.backward(dy, retain_graph=True)`` of a graph
  built once in ``prepare()``: gradients to the fusion's query/key/value and to both inputs;
* ``full`` (block) / ``train_step`` (model): forward + backward, ``fn(*xs).backward(dy)`` (a
  fusion-training step without the optimizer step; for ``plain`` the backward reaches only the
  inputs, which have no weights to train).

Gradient modes drop the previous gradients before each call (a training step starts from
``zero_grad(set_to_none=True)``), so no call pays for accumulating into the last call's ``.grad``.
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch

from .models import Setup
from .providers import Runner

__all__ = ["BLOCK_MODES", "MODEL_MODES", "GRAD_FREE_MODES", "tokens_shape", "make_inputs", "prepare_call"]

BLOCK_MODES = ("forward", "backward", "full")
MODEL_MODES = ("inference", "train_step")
GRAD_FREE_MODES = ("forward", "inference")


def tokens_shape(tokens: int, seq_len: int) -> Tuple[int, int]:
    """``(B, S)`` of a token count; ``ValueError`` (naming the CLI options) if it does not split."""
    if tokens < 1:
        raise ValueError(f"token counts must be positive, got {tokens}")
    if tokens <= seq_len:
        return 1, tokens
    if tokens % seq_len:
        raise ValueError(f"--tokens / --model-tokens {tokens} must be at most or a multiple of --seq-len {seq_len}")
    return tokens // seq_len, seq_len


def make_inputs(setup: Setup, kind: str, tokens: int, seq_len: int, seed: int):
    """``(inputs, dy, (B, S))`` of one case, as the module doc says."""
    B, S = tokens_shape(tokens, seq_len)
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(setup.device, setup.dtype)  # noqa: E731
    if kind == "block":
        width_h, width_x = setup.family.block_in(setup.shape)
        inputs = (mk(B, S, width_h, scale=0.5), mk(B, S, width_x))
    else:
        inputs = (mk(B, S, setup.shape.hidden),)
    gd = torch.Generator().manual_seed(seed + 7)
    dy = torch.randn(B, S, setup.shape.hidden, generator=gd).to(setup.device, setup.dtype)
    return inputs, dy, (B, S)


def prepare_call(runner: Runner, inputs, dy, mode: str) -> Callable[[], Callable[[], object]]:
    """``prepare()`` -> the call to time for ``mode`` (module doc); ``prepare`` itself is untimed."""
    if mode in GRAD_FREE_MODES:
        def prepare():
            def call():
                with torch.no_grad():
                    return runner.fn(*inputs)
            return call
        return prepare

    def clear(xs):
        for t in list(xs) + list(runner.fusion_params):
            t.grad = None

    if mode == "backward":
        def prepare():
            xs = [t.detach().clone().requires_grad_(True) for t in inputs]
            clear(xs)
            out = runner.fn(*xs)

            def call():
                clear(xs)
                out.backward(dy, retain_graph=True)
            return call
        return prepare

    def prepare():  # full / train_step
        xs = [t.detach().clone().requires_grad_(True) for t in inputs]

        def call():
            clear(xs)
            runner.fn(*xs).backward(dy)
        return call
    return prepare
