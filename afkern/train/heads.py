"""The classification head that ``afkern-train`` puts on the pooled encoder output, the encoder +
head module, and the head's files (``classifier.safetensors`` + ``classifier.json``)."""

from __future__ import annotations

import json
import os
from typing import Tuple

import torch
import torch.nn as nn

from .._io import atomic_write_bytes, atomic_write_json

__all__ = ["ClassificationHead", "AdapterClassifier", "save_head", "load_head", "HEAD_WEIGHTS", "HEAD_CONFIG"]

HEAD_WEIGHTS, HEAD_CONFIG = "classifier.safetensors", "classifier.json"


class ClassificationHead(nn.Module):
    """``dropout -> dense -> tanh -> dropout -> out`` on the pooled encoder output.

    ``pooling``: ``"mean"`` (masked mean over tokens, what MiniLM sentence embeddings use) or
    ``"cls"`` (the first token). Input [batch, seq, d] and mask [batch, seq]; output [batch, labels].
    """

    def __init__(self, hidden_size: int, num_labels: int, pooling: str = "mean", dropout: float = 0.1):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.pooling, self.num_labels, self.hidden_size = pooling, num_labels, hidden_size
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, num_labels)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.pool(hidden, mask))
        return self.out(self.dropout(torch.tanh(self.dense(x))))


class AdapterClassifier(nn.Module):
    """A (patched) transformers encoder with a :class:`ClassificationHead`: logits [batch, labels]."""

    def __init__(self, encoder: nn.Module, head: ClassificationHead):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
        return self.head(hidden, attention_mask)


def save_head(head: ClassificationHead, directory: str, meta: dict) -> str:
    """Write the head's weights and ``meta`` (plus its sizes and pooling) atomically; returns ``directory``."""
    from safetensors.torch import save

    sd = {k: v.detach().float().contiguous().cpu() for k, v in head.state_dict().items()}
    atomic_write_bytes(os.path.join(directory, HEAD_WEIGHTS), save(sd, metadata={"format": "pt"}))
    atomic_write_json(os.path.join(directory, HEAD_CONFIG), dict(meta, hidden_size=head.hidden_size,
                                                                   num_labels=head.num_labels, pooling=head.pooling))
    return directory


def load_head(directory: str) -> Tuple[ClassificationHead, dict]:
    """(head, meta) from :func:`save_head`'s files."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, HEAD_CONFIG)) as f:
        meta = json.load(f)
    head = ClassificationHead(int(meta["hidden_size"]), int(meta["num_labels"]), meta.get("pooling", "mean"))
    head.load_state_dict(load_file(os.path.join(directory, HEAD_WEIGHTS)))
    return head, meta
