"""The base-model weights of an AdapterHub model that the plain transformers model lacks.

``adapters.init`` wraps DeBERTa v1's bias-free ``attention.self.in_proj`` (``nn.Linear(d, 3d,
bias=False)``) in a LoRA layer whose constructor creates ``nn.Linear(..., bias=True)`` and keeps
its randomly drawn bias ``b``: AdapterHub's DeBERTa then computes another function than the
transformers model (by ~30% with no adapter active). :func:`drop_added_base_params` refuses such a
model by default; :func:`fold_adapterhub_bias` (``from_adapterhub(..., keep_adapterhub_bias=True)``)
reproduces AdapterHub's function exactly in the plain model.

DeBERTa's attention reads ``in_proj``'s output per head as ``[q_h | k_h | v_h]`` (``transpose_for_scores``
then ``chunk(3)``), then adds ``q_bias`` to q and ``v_bias`` to v. So with ``b`` viewed as
``[heads, 3, head_dim]``:

    q = x Wq + b_q + q_bias     ->  q_bias' = q_bias + b_q  (exact)
    v = x Wv + b_v + v_bias     ->  v_bias' = v_bias + b_v  (exact)
    k = x Wk + b_k

The key part adds ``q . b_k`` to the content-to-content score of every key of a query: the same for
every key, so the softmax over keys cancels it, and content-to-position (``c2p``) does not read k.
Position-to-content (``p2c``) scores ``k_j . q_pos(i - j)``, whose ``b_k`` term changes with the
relative position: with ``p2c`` on, ``b_k`` is carried as the bias of a biased ``in_proj`` (zero
in its q and v rows); without it, it is dropped and the model keeps the plain transformers
structure. (``in_proj`` is only used on the first ``query_states is None`` path, as in AdapterHub.)
A biased ``in_proj`` is a module the transformers class does not have: ``save_pretrained`` writes
its bias and ``DebertaModel.from_pretrained`` drops it (with transformers' unused-weights warning).
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn

__all__ = ["drop_added_base_params", "fold_adapterhub_bias"]

_IN_PROJ_BIAS = "attention.self.in_proj.bias"


def fold_adapterhub_bias(sd: Dict[str, torch.Tensor], plain: nn.Module) -> None:
    """Fold AdapterHub's DeBERTa v1 ``in_proj`` biases in the state dict ``sd`` (keys as ``plain``
    names them) into ``q_bias`` / ``v_bias``; carry the key part in a biased ``in_proj`` of
    ``plain`` when ``p2c`` attention is on (module doc). Other models: nothing to do."""
    have = set(plain.state_dict())
    for key in [k for k in sd if k.endswith(_IN_PROJ_BIAS) and k not in have]:
        owner = key[: -len(".in_proj.bias")]
        attn = plain.get_submodule(owner)
        heads = attn.num_attention_heads
        b = sd.pop(key).view(heads, 3, -1)
        sd[f"{owner}.q_bias"] = sd[f"{owner}.q_bias"] + b[:, 0].reshape(-1).to(sd[f"{owner}.q_bias"].dtype)
        sd[f"{owner}.v_bias"] = sd[f"{owner}.v_bias"] + b[:, 2].reshape(-1).to(sd[f"{owner}.v_bias"].dtype)
        if "p2c" in (getattr(attn, "pos_att_type", None) or ()):
            old = attn.in_proj
            attn.in_proj = nn.Linear(old.in_features, old.out_features, bias=True, device=old.weight.device,
                                     dtype=old.weight.dtype)
            kb = torch.zeros_like(b)
            kb[:, 1] = b[:, 1]
            sd[key] = kb.reshape(-1)


def drop_added_base_params(sd: Dict[str, torch.Tensor], plain: nn.Module) -> None:
    """Remove from ``sd`` the base-model parameters ``adapters.init`` added that the plain model
    cannot hold, if they are zero; else a ValueError that explains (DeBERTa v1's ``in_proj.bias``)."""
    have = set(plain.state_dict())
    extra = [k for k in sd if k not in have]
    nonzero = [k for k in extra if bool(sd[k].ne(0).any())]
    if nonzero:
        deberta = [k for k in nonzero if k.endswith("in_proj.bias")]
        if deberta:
            raise ValueError(
                f"this AdapterHub DeBERTa (v1) model has non-zero {deberta[:2]}{' ...' if len(deberta) > 2 else ''}: "
                "adapters.init wraps the bias-free attention.self.in_proj in a LoRA layer that adds a randomly "
                "initialised bias, so AdapterHub's DeBERTa computes another function than the transformers model "
                "(by ~30% with no adapter active). Pass keep_adapterhub_bias=True to reproduce AdapterHub's "
                "function exactly (its query and value parts fold into q_bias / v_bias, the key part is carried "
                "where p2c attention needs it), or, to compute the plain DeBERTa with your adapters (outputs "
                "change), zero it first:\n"
                "    with torch.no_grad():\n"
                "        for n, p in model.named_parameters():\n"
                "            if n.endswith('attention.self.in_proj.bias'): p.zero_()"
            )
        raise ValueError(f"the AdapterHub model has base-model parameters the plain {type(plain).__name__} lacks: "
                         f"{nonzero[:4]}; afkern converts the plain transformers model only")
    for k in extra:
        del sd[k]
