"""One named AdapterFusion over a subset of a block's adapters (AdapterHub's ``BertFusion``).

A :class:`FusedAdapterBlock` holds its adapters once (stacked) and any number of these in
``block.fusions`` (docs/DESIGN.md section 7): each has its own query, key and value maps, its
``FusionConfig``, score-dropout rate and softmax temperature, and names the adapters it mixes.
"""

from __future__ import annotations

import threading
import weakref
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
from torch.nn.modules.module import register_module_module_registration_hook

from .config import FusionConfig

__all__ = ["AdapterFusion", "T_START", "attach_temperature_clock", "start_temperature_step"]

#: AdapterHub's starting temperature under ``FusionConfig(temperature=True)``; it falls by
#: T_START / 1000 after every forward, down to 1.
T_START = 50.0


class AdapterFusion(nn.Module):
    """Query, key and value of one fusion, as AdapterHub's ``BertFusion`` builds and initialises them.

    Args:
        hidden_size: d.
        adapter_names: the adapters this fusion mixes, in its order (a subset of the block's).
        config: a :class:`FusionConfig` (or anything ``FusionConfig.load`` takes).
        score_dropout: the rate of dropout on the scores in training (AdapterHub: the config's
            ``dropout_prob``, else the model's ``attention_probs_dropout_prob``).

    Parameters (AdapterHub names): ``query``, ``key`` (nn.Linear d -> d), ``value`` (no bias), each
    None when the config turns it off.
    """

    def __init__(self, hidden_size: int, adapter_names: Sequence[str], config=None, score_dropout: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        self.config = FusionConfig.load(config)
        self.adapter_names: List[str] = list(adapter_names)
        self.hidden_size = hidden_size
        fc, fk = self.config, dict(device=device, dtype=dtype)
        self.query = nn.Linear(hidden_size, hidden_size, **fk) if fc.query else None
        self.key = nn.Linear(hidden_size, hidden_size, **fk) if fc.key else None
        self.value = nn.Linear(hidden_size, hidden_size, bias=False, **fk) if fc.value else None
        if not 0.0 <= float(score_dropout) < 1.0:
            raise ValueError(f"score dropout must be in [0, 1), got {score_dropout!r}")
        self.score_dropout = float(score_dropout)
        self._temperature = 1.0
        # the temperature clock of a model forward (``start_temperature_step``): None for a fusion no
        # model drives; else the temperatures this step's forwards used, in call order
        self._step_temps: Optional[List[float]] = None
        #: inference-time control of this fusion's weights (``afkern.control``); None: plain fusion
        self.control: Optional["FusionControl"] = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """AdapterHub's initialisation: normal(0, 0.02) weights, zero biases, value near identity."""
        for lin in (self.query, self.key, self.value):
            if lin is not None:
                lin.weight.normal_(mean=0.0, std=0.02)
                if lin.bias is not None:
                    lin.bias.zero_()
        if self.value is not None and self.config.value_initialized:
            self.value.weight.fill_(1e-6).fill_diagonal_(1.0)
        self._temperature = T_START if self.config.temperature else 1.0

    @property
    def temperature(self) -> float:
        """The softmax temperature of the next forward (annealed from 50 to 1 when ``temperature`` is on)."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        value = float(value)
        if not value >= 1.0:
            raise ValueError(f"temperature must be >= 1, got {value!r}")
        if not self.config.temperature and value != 1.0:
            raise ValueError(f"this fusion has FusionConfig(temperature=False): its temperature is 1, got {value}")
        self._temperature = value

    def begin_forward(self) -> float:
        """The temperature this forward uses. AdapterHub lowers it by T_START / 1000 after every
        call of the fusion layer (train and eval alike; ALBERT's shared layers call it once per
        depth).

        In a model that afkern patched or loaded, a forward of the model opens a step
        (:func:`start_temperature_step`): each call of the fusion in the step uses the current
        temperature and anneals it, as AdapterHub does, and the step remembers the values used.
        Gradient checkpointing recomputes calls inside backward, last call first: such a
        recomputation takes back the value its call used, so it sees the same temperature and the
        temperature moves only with the model's forwards. A fusion that no model drives (a
        standalone block) anneals on every forward, as AdapterHub.

        Limits: two model forwards followed by one backward over both losses give the first
        forward's recomputations the second forward's values; the usual forward / backward loop,
        gradient accumulation included, is exact."""
        if not self.config.temperature:
            return self._temperature
        steps = self._step_temps
        if steps and torch._C._current_graph_task_id() != -1:
            return steps.pop()  # a recomputation inside backward: calls replay last first
        t = self._temperature
        self._temperature = max(t - T_START / 1000.0, 1.0)
        if steps is not None:
            steps.append(t)
        return t

    def get_extra_state(self) -> torch.Tensor:
        # The temperature travels with state_dict (AdapterHub loses it on reload), as a float64
        # tensor so every consumer of state_dict (safetensors, weights_only loads, the TorchScript
        # ONNX exporter) can hold it.
        return torch.tensor([self._temperature], dtype=torch.float64)

    def set_extra_state(self, state) -> None:
        (t,) = torch.as_tensor(state).reshape(-1)[:1].tolist()
        self._temperature = float(t)

    def regularization_loss(self) -> Optional[torch.Tensor]:
        """AdapterHub's ``0.01 * ||I - Wv||_F^2`` when the value matrix is trained, else None
        (``get_fusion_regularization_loss``; like it, whatever ``config.regularization`` says:
        that flag tells the trainer whether to add the loss)."""
        v = self.value
        if v is None or not v.weight.requires_grad:
            return None
        eye = torch.eye(self.hidden_size, device=v.weight.device, dtype=v.weight.dtype)
        return 0.01 * (eye - v.weight).pow(2).sum()

    def extra_repr(self) -> str:
        kind = "dynamic" if self.config.value else "static"
        return f"adapters={self.adapter_names}, {kind}, score_dropout={self.score_dropout}"


def start_temperature_step(model: nn.Module, *args) -> None:
    """Forward pre-hook of a patched model: open a temperature step for every annealed fusion in
    it, so each call anneals as in AdapterHub and a recomputation of a call (gradient
    checkpointing, reentrant or not) sees the temperature that call used
    (:meth:`AdapterFusion.begin_forward`). Fusions that do not run in this forward do not anneal."""
    if torch.compiler.is_compiling():
        return None  # compiled graphs keep the per-forward rule (the module walk is not traced)
    for m in fusions_of(model):
        if m.config.temperature:
            m._step_temps = []
    return None


# The fusions of a model, found by one walk of its modules and kept until a module is registered
# anywhere in the process (torch's global registration hook bumps the generation: add_fusion,
# patching, loading, any submodule assignment). A decoding step then costs no walk of the model
# (about 550 modules for GPT-2 small). A removed fusion stays listed until the next registration;
# opening a step on it is harmless (it does not run in this model).
_GENERATION = [0]
_FUSIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_FUSIONS_LOCK = threading.Lock()


def _bump_generation(module, name, submodule):
    _GENERATION[0] += 1
    return None


register_module_module_registration_hook(_bump_generation)


def fusions_of(model: nn.Module) -> List["AdapterFusion"]:
    """Every :class:`AdapterFusion` in ``model`` (cached per model; see above)."""
    gen = _GENERATION[0]
    with _FUSIONS_LOCK:
        hit = _FUSIONS.get(model)
    if hit is not None and hit[0] == gen:
        return hit[1]
    found = [m for m in model.modules() if isinstance(m, AdapterFusion)]
    with _FUSIONS_LOCK:
        _FUSIONS[model] = (gen, found)
    return found


def attach_temperature_clock(model: nn.Module) -> nn.Module:
    """Register :func:`start_temperature_step` on ``model`` once (afkern's patch and load
    functions call this; call it yourself for a model whose blocks you placed by hand). The hook
    is a module-level function, so ``copy.deepcopy`` of the model keeps a working clock."""
    if not any(h is start_temperature_step for h in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(start_temperature_step)
    return model


class FusionControl:
    """What a block does with its active fusion's weights at inference (``afkern.control``).

    Exactly one of ``log_prior`` ([N]: added to the tempered scores before the softmax; ``-inf``
    removes an adapter) and ``probs`` ([N], non-negative, summing to 1: a fixed mixing vector) is
    set. Both become inputs of the row op (docs/DESIGN.md section 5): a prior ``b``, and for fixed
    weights ``inv_temperature = 0`` with ``b = log p``, so ``softmax(0 * s + log p) = p`` on every
    backend.
    """

    def __init__(self, log_prior: Optional[torch.Tensor] = None, probs: Optional[torch.Tensor] = None):
        if (log_prior is None) == (probs is None):
            raise ValueError("FusionControl takes exactly one of log_prior and probs")
        self.log_prior = None if log_prior is None else log_prior.detach().to(torch.float64)
        self.probs = None if probs is None else probs.detach().to(torch.float64)

    def __repr__(self) -> str:
        if self.probs is not None:
            return f"FusionControl(probs={self.probs.tolist()})"
        return f"FusionControl(log_prior={self.log_prior.tolist()})"

    @property
    def n_adapters(self) -> int:
        return (self.probs if self.probs is not None else self.log_prior).shape[0]

    def row_inputs(self, n_adapters: int, inv_temperature: float, device, dtype):
        """(prior [N] in the row op's accumulation dtype, inv_temperature) for a block of ``n_adapters``."""
        if self.n_adapters != n_adapters:
            raise ValueError(f"fusion control for {self.n_adapters} adapters applied to a fusion of {n_adapters}")
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        if self.probs is not None:
            return self.probs.log().to(device=device, dtype=acc), 0.0
        return self.log_prior.to(device=device, dtype=acc), inv_temperature
