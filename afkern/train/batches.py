"""Tokenised splits and the batches of an epoch: a split is tokenised once, unpadded; each batch is
padded to its longest example. The epoch order is a seeded permutation, sharded across DDP ranks."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from .data import TaskData
from .dist import Dist, shard

__all__ = ["Encoded", "encode_task", "epoch_batches"]


class Encoded:
    """A tokenised split: token id lists (unpadded), labels [n], and :meth:`batch`, the collate to a
    padded batch (``input_ids``, ``attention_mask`` and, where the tokenizer has them,
    ``token_type_ids``, each [batch, longest])."""

    def __init__(self, tokenizer, text, pair, labels, max_length: int):
        enc = tokenizer(text, pair, truncation=True, max_length=max_length, padding=False) if pair is not None else \
            tokenizer(text, truncation=True, max_length=max_length, padding=False)
        self.input_ids = enc["input_ids"]
        self.token_type_ids = enc.get("token_type_ids")
        self.labels = torch.tensor(labels, dtype=torch.long)
        pad = tokenizer.pad_token_id
        self.pad_id = 0 if pad is None else int(pad)

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, idx: Sequence[int], device) -> dict:
        L = max(len(self.input_ids[i]) for i in idx)
        ids = torch.full((len(idx), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), L), dtype=torch.long)
        tt = torch.zeros((len(idx), L), dtype=torch.long) if self.token_type_ids is not None else None
        for j, i in enumerate(idx):
            n = len(self.input_ids[i])
            ids[j, :n] = torch.tensor(self.input_ids[i])
            mask[j, :n] = 1
            if tt is not None:
                tt[j, :n] = torch.tensor(self.token_type_ids[i])
        out = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        if tt is not None:
            out["token_type_ids"] = tt.to(device)
        return out


def encode_task(tok, task: TaskData, max_length: int) -> Tuple[Encoded, Encoded]:
    """(train, dev) of ``task`` tokenised."""
    return (Encoded(tok, task.train_text, task.train_pair, task.train_labels, max_length),
            Encoded(tok, task.dev_text, task.dev_pair, task.dev_labels, max_length))


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, d: Dist) -> List[List[int]]:
    """This rank's batches (example indices) of ``epoch``: the same on every run with the same seed."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    mine, _ = shard(order, d)
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
