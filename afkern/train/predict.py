"""``afkern-train predict``: classify new texts with the classifiers an ``afkern-train`` run wrote,
several tasks in one batch.

A task NAME of an output directory is a fusion target (``fusion-NAME/``: copies of the fused
adapters, the fusion ``a,b,...`` and ``classifier/``) or a stage-1 task (``adapters/NAME`` and
``heads/NAME``); where both exist (the demo's target) the fusion is taken, and ``adapter:NAME``
asks for the single adapter. :class:`Predictor` builds ONE encoder with every adapter the tasks
use and each fusion task's fusion under the task's own name, and one head per task. A batch mixes
the tasks, fusion targets and stage-1 tasks alike: ``afkern.route(setup=...)`` sends each sequence
through its task's fusion or its task's single adapter, one forward a batch. So each row's
prediction is the one its task's own classifier (:func:`afkern.train.load_classifier`) gives run
alone. Output: per row the task, the predicted label, its probability (the softmax of the head's
logits) and every label's probability. A fusion pruned with ``--prune-k`` is not what runs here
(the full fusion is); ``load_classifier(..., pruned=PATH)`` rebuilds the pruned one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import torch

from .. import fused_blocks, load_adapterhub, route
from .._io import atomic_write_bytes
from ..adapterhub import ADAPTER_WEIGHTS, _read_tensors, _weights_file
from .batches import Encoded
from .data import read_table, read_texts
from .errors import DataError, TrainError
from .heads import HEAD_CONFIG, load_head
from .metrics import ADAPTER_METRICS, FUSION_METRICS, read_metrics
from .models import default_model_dir, load_base_model, load_tokenizer

__all__ = ["Predictor", "predict", "find_task", "read_inputs", "write_predictions", "run_predict", "add_predict_parser"]

DEFAULT_MAX_LENGTH = 128  # afkern-train's default --max-length, for a run that recorded none


@dataclass
class TaskFiles:
    """Where one task's classifier lives in an output directory."""

    name: str
    kind: str  # "fusion" or "adapter"
    adapters: Dict[str, str]  # adapter name -> AdapterHub directory
    head_dir: str
    fusion_dir: Optional[str] = None
    meta: dict = field(default_factory=dict)  # classifier.json
    run: dict = field(default_factory=dict)  # the metrics record of the run that trained it

    @property
    def label_names(self) -> List[str]:
        return list(self.meta["label_names"])


def _tasks_in(out_dir: str) -> List[str]:
    fus = sorted(e[len("fusion-"):] for e in os.listdir(out_dir)
                 if e.startswith("fusion-") and os.path.isfile(os.path.join(out_dir, e, "classifier", HEAD_CONFIG)))
    heads = os.path.join(out_dir, "heads")
    ada = sorted(e for e in os.listdir(heads) if os.path.isfile(os.path.join(heads, e, HEAD_CONFIG))) \
        if os.path.isdir(heads) else []
    return fus + [f"adapter:{n}" if n in fus else n for n in ada]


def find_task(out_dir: str, spec: str) -> TaskFiles:
    """The files of task ``spec`` (``NAME``, or ``adapter:NAME`` for the stage-1 classifier) in
    ``out_dir``; TrainError naming the tasks the directory has if there is no such task."""
    if not os.path.isdir(out_dir):
        raise TrainError(f"--output-dir {out_dir} does not exist (expected the folder an afkern-train run wrote)")
    want_adapter = spec.startswith("adapter:")
    name = spec[len("adapter:"):] if want_adapter else spec
    fdir = os.path.join(out_dir, f"fusion-{name}")
    if not want_adapter and os.path.isfile(os.path.join(fdir, "classifier", HEAD_CONFIG)):
        head_dir = os.path.join(fdir, "classifier")
        meta = _read_json(os.path.join(head_dir, HEAD_CONFIG))
        names = list(meta.get("adapters") or [])
        adapters = {n: os.path.join(fdir, n) for n in names}
        fusion = os.path.join(fdir, ",".join(names))
        missing = [p for p in list(adapters.values()) + [fusion] if not os.path.isdir(p)]
        if not names or missing:
            raise TrainError(f"task {name!r}: {fdir} is incomplete (classifier.json names adapters {names}; "
                             f"missing {missing}); rerun `afkern-train fusion` for it")
        runs = (read_metrics(os.path.join(out_dir, FUSION_METRICS)) or {}).get("targets") or {}
        return TaskFiles(name, "fusion", adapters, head_dir, fusion, meta, runs.get(name) or {})
    head_dir, adir = os.path.join(out_dir, "heads", name), os.path.join(out_dir, "adapters", name)
    if os.path.isfile(os.path.join(head_dir, HEAD_CONFIG)) and os.path.isdir(adir):
        run = read_metrics(os.path.join(out_dir, ADAPTER_METRICS)) or {}
        return TaskFiles(name, "adapter", {name: adir}, head_dir, None, _read_json(os.path.join(head_dir, HEAD_CONFIG)), run)
    have = _tasks_in(out_dir)
    raise TrainError(f"unknown task {spec!r} in {out_dir}: it has " + (f"the tasks {have}" if have else
                     "no trained classifiers (fusion-NAME/classifier or heads/NAME)"))


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise TrainError(f"{path} is not readable JSON ({exc})") from None


def _same_weights(a: str, b: str) -> bool:
    ta, tb = (_read_tensors(_weights_file(d, ADAPTER_WEIGHTS)) for d in (a, b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


class Predictor:
    """The classifiers of several tasks of one ``afkern-train`` output directory as one model.

    ``tasks``: task names (``adapter:NAME`` for a stage-1 classifier where a fusion of that name
    exists too). ``model``: the base checkpoint (default: the one the runs recorded). ``dtype``:
    e.g. ``torch.float64`` for an exact comparison. :meth:`predict` classifies texts, each with its
    own task, in mixed batches of ``batch_size``.
    """

    def __init__(self, output_dir: str, tasks: Sequence[str], model: Optional[str] = None, backend: str = "auto",
                 device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None, batch_size: int = 64,
                 max_length: Optional[int] = None):
        if not tasks:
            raise TrainError("predict needs at least one task (--task NAME)")
        if len(set(tasks)) != len(tasks):
            raise TrainError(f"task given twice in {list(tasks)}")
        if batch_size < 1:
            raise TrainError(f"batch size must be >= 1, got {batch_size}")
        self.files = {t: find_task(output_dir, t) for t in tasks}
        self.device, self.batch_size = torch.device(device), batch_size
        self.model_dir = model or self._recorded_model()
        adapters: Dict[str, str] = {}
        for f in self.files.values():
            for n, d in f.adapters.items():
                if n in adapters and os.path.realpath(adapters[n]) != os.path.realpath(d) and not _same_weights(adapters[n], d):
                    raise TrainError(f"adapter {n!r} differs between {adapters[n]} and {d}; tasks whose fusions were "
                                     "trained over different adapters of one name cannot share a model: predict them "
                                     "in separate calls")
                adapters.setdefault(n, d)
        fusions = {t: f.fusion_dir for t, f in self.files.items() if f.kind == "fusion"}
        try:
            enc = load_adapterhub(load_base_model(self.model_dir), adapters, fusion_dir=fusions or None, backend=backend)
        except (ValueError, FileNotFoundError, TypeError) as exc:
            raise TrainError(f"could not build the model of tasks {list(tasks)}: {exc}") from None
        self.heads = {}
        for t, f in self.files.items():
            head, _ = load_head(f.head_dir)
            self.heads[t] = head
            temps = f.meta.get("fusion_temperatures") or {}
            if f.kind == "fusion" and temps:  # the annealed temperature each fusion ended training at
                blocks = dict(fused_blocks(enc))
                for block_name, temp in temps.items():
                    blocks[block_name].fusions[t].temperature = float(temp)
        self.encoder = enc.to(self.device).eval()
        for h in self.heads.values():
            h.to(self.device).eval()
        if dtype is not None:
            self.encoder.to(dtype)
            for h in self.heads.values():
                h.to(dtype)
        self.tokenizer = load_tokenizer(self.model_dir)
        self._tokenizer_lock = threading.Lock()  # a fast tokenizer is not reentrant ("Already borrowed")
        self.max_length = {t: int(max_length or (f.run.get("settings") or {}).get("max_length") or DEFAULT_MAX_LENGTH)
                           for t, f in self.files.items()}

    def _recorded_model(self) -> str:
        found = {f.run.get("model") for f in self.files.values()} - {None}
        if len(found) > 1:
            raise TrainError(f"the tasks were trained on different base models {sorted(found)}; predict them in "
                             "separate calls")
        path = found.pop() if found else default_model_dir()
        if not os.path.isdir(path):
            raise TrainError(f"the base model {path} recorded by the run is not there; pass --model DIR")
        return path

    def label_names(self, task: str) -> List[str]:
        return self.files[task].label_names

    @torch.no_grad()
    def predict(self, texts: Sequence[str], tasks: Union[str, Sequence[str], None] = None,
                pairs: Optional[Sequence[str]] = None) -> List[dict]:
        """One ``{"task", "label", "probability", "probabilities"}`` per text, in order. ``tasks``:
        one task per text, or one for all (default: the only task)."""
        if tasks is None:
            if len(self.files) != 1:
                raise TrainError(f"several tasks {list(self.files)}: give the task of each text")
            tasks = next(iter(self.files))
        tasks = [tasks] * len(texts) if isinstance(tasks, str) else list(tasks)
        if len(tasks) != len(texts) or (pairs is not None and len(pairs) != len(texts)):
            raise TrainError(f"{len(texts)} texts but {len(tasks)} tasks" + ("" if pairs is None else f" and {len(pairs)} pairs"))
        unknown = sorted(set(tasks) - set(self.files))
        if unknown:
            raise TrainError(f"unknown task(s) {unknown}; this predictor holds {list(self.files)}")
        ids: List[List[int]] = [[] for _ in texts]
        tts: List[Optional[List[int]]] = [None] * len(texts)
        for t in set(tasks):  # tokenised as the task was trained (its --max-length)
            rows = [i for i, x in enumerate(tasks) if x == t]
            with self._tokenizer_lock:
                enc = Encoded(self.tokenizer, [texts[i] for i in rows], None if pairs is None else [pairs[i] for i in rows],
                              [0] * len(rows), self.max_length[t])
            for j, i in enumerate(rows):
                ids[i] = enc.input_ids[j]
                tts[i] = None if enc.token_type_ids is None else enc.token_type_ids[j]
        out: List[Optional[dict]] = [None] * len(texts)
        for s in range(0, len(texts), self.batch_size):  # every task mixed in each batch
            self._batch(list(range(s, min(s + self.batch_size, len(texts)))), ids, tts, tasks, out)
        return out  # type: ignore[return-value]

    def _setup(self, task: str) -> str:
        """The route entry of a row of ``task``: its fusion (named by the task) or its adapter."""
        f = self.files[task]
        return f"fusion:{task}" if f.kind == "fusion" else f"adapter:{next(iter(f.adapters))}"

    def _batch(self, rows, ids, tts, tasks, out) -> None:
        coll = Encoded.__new__(Encoded)  # Encoded.batch pads a list of token id lists
        coll.input_ids = [ids[i] for i in rows]
        coll.token_type_ids = None if tts[rows[0]] is None else [tts[i] for i in rows]
        pad = self.tokenizer.pad_token_id
        coll.pad_id = 0 if pad is None else int(pad)
        b = coll.batch(range(len(rows)), self.device)
        with route(self.encoder, setup=[self._setup(tasks[i]) for i in rows]):
            hidden = self.encoder(**b).last_hidden_state
        for t in set(tasks[i] for i in rows):
            sel = [j for j, i in enumerate(rows) if tasks[i] == t]
            idx = torch.tensor(sel, device=self.device)
            probs = torch.softmax(self.heads[t](hidden[idx], b["attention_mask"][idx]).double(), -1).cpu()
            labels = self.label_names(t)
            for j, p in zip(sel, probs):
                k = int(p.argmax())
                out[rows[j]] = {"task": t, "label": labels[k], "probability": float(p[k]),
                                "probabilities": dict(zip(labels, p.tolist()))}


def read_inputs(path: str, tasks: Sequence[str], text_column: str = "text", pair_column: Optional[str] = "text_pair",
                task_column: str = "task") -> dict:
    """The rows of an input file (CSV / TSV / JSON / JSONL, see :func:`afkern.train.read_table`):
    ``{"texts", "pairs" (None without that column), "tasks", "where"}``. With one task a row may
    omit ``task_column``; with several each row names its task there. DataError names the file and
    line of a bad row (no text, an unknown task)."""
    rows, locs = read_table(path)
    cols = set().union(*rows)
    if text_column not in cols:
        raise DataError(f"{path}: no {text_column!r} column (found {sorted(map(str, cols))}); "
                        "pass --text-column NAME if the texts are in another column")
    if len(tasks) > 1 and task_column not in cols:
        raise DataError(f"{path}: several tasks {list(tasks)} but no {task_column!r} column naming each row's task "
                        "(pass --task-column NAME, or predict one task at a time)")
    texts, pairs = read_texts(rows, locs, text_column, pair_column if pair_column in cols else None)
    row_tasks = []
    for r, loc in zip(rows, locs):
        task = r.get(task_column, tasks[0] if len(tasks) == 1 else None)
        if task not in tasks:
            raise DataError(f"{loc}: task {task!r} is not one of the tasks asked for ({list(tasks)})")
        row_tasks.append(task)
    return {"texts": texts, "pairs": pairs, "tasks": row_tasks, "where": locs}


def write_predictions(path: str, preds: Sequence[dict], where: Optional[Sequence[str]] = None) -> None:
    """Atomically: JSONL (one object a line) unless ``path`` ends in .csv (columns task, label,
    probability)."""
    if path.lower().endswith(".csv"):
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["task", "label", "probability"])
        for p in preds:
            w.writerow([p["task"], p["label"], repr(p["probability"])])
        data = buf.getvalue()
    else:
        data = "".join(json.dumps(p) + "\n" for p in preds)
    atomic_write_bytes(path, data.encode("utf-8"))


def predict(output_dir: str, tasks: Union[str, Sequence[str]], data: Union[str, Sequence[str]], out: Optional[str] = None,
            *, text_column: str = "text", pair_column: Optional[str] = "text_pair", task_column: str = "task",
            **predictor_kw) -> List[dict]:
    """Classify ``data`` (a CSV / TSV / JSON / JSONL file, or a list of texts for one task) with the
    classifiers of ``tasks`` in ``output_dir``; returns one prediction per row and, with ``out``,
    writes them there (atomically). ``predictor_kw``: :class:`Predictor`'s options."""
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    for t in tasks:  # the tasks first (cheap), then the input file, then the model
        find_task(output_dir, t)
    if isinstance(data, str):
        inp = read_inputs(data, tasks, text_column, pair_column, task_column)
    else:
        if len(tasks) != 1:
            raise TrainError("a list of texts is classified with one task; for several, give a file with a task column")
        inp = {"texts": list(data), "pairs": None, "tasks": tasks * len(data)}
    preds = Predictor(output_dir, tasks, **predictor_kw).predict(inp["texts"], inp["tasks"], inp["pairs"])
    if out is not None:
        write_predictions(out, preds)
    return preds


def add_predict_parser(sub, formatter) -> None:
    """The ``predict`` subcommand's options (registered by :func:`afkern.train.cli.build_parser`)."""
    p = sub.add_parser("predict", formatter_class=formatter,
                       help="classify new texts with trained tasks (several tasks routed in one batch)")
    p.add_argument("file", metavar="FILE", help="the texts: CSV / TSV (header row) or JSON / JSONL, one row per text "
                   "with a --text-column (and, for several --task, a --task-column naming each row's task)")
    p.add_argument("--output-dir", required=True, help="the folder an afkern-train run wrote (fusion-NAME/, heads/, adapters/)")
    p.add_argument("--task", action="append", required=True, metavar="NAME",
                   help="a trained task: a fusion target (fusion-NAME/) or a stage-1 task (heads/NAME); adapter:NAME "
                        "picks the stage-1 classifier where both exist; repeat for several tasks")
    p.add_argument("--out", default=None, metavar="PATH", help="write the predictions here (atomically): .jsonl, one "
                   "JSON object a line (task, label, probability, probabilities), or .csv (task, label, probability); "
                   "default: JSONL on standard output")
    p.add_argument("--text-column", default="text", help="column with the text")
    p.add_argument("--text-pair-column", default="text_pair", help="column with the optional second segment")
    p.add_argument("--task-column", default="task", help="column naming each row's task (needed with several --task)")
    p.add_argument("--model", default=None, help="the base checkpoint folder (default: the one the run recorded)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda", "reference"],
                   help="afkern backend for the fused blocks")
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu or cuda")
    p.add_argument("--batch-size", type=int, default=64, help="texts per forward (the tasks mixed)")
    p.add_argument("--max-length", type=int, default=None,
                   help="truncate inputs to this many tokens (default: each task's training --max-length)")


def run_predict(cfg) -> dict:
    """``afkern-train predict``: the predictions to ``--out`` (or standard output), one a line."""
    from .dist import init_dist

    device = init_dist(cfg.device).device
    preds = predict(cfg.output_dir, cfg.task, cfg.file, cfg.out, text_column=cfg.text_column,
                    pair_column=cfg.text_pair_column, task_column=cfg.task_column, model=cfg.model,
                    backend=cfg.backend, device=device, batch_size=cfg.batch_size, max_length=cfg.max_length)
    if cfg.out is None:
        for p in preds:
            print(json.dumps(p))
    else:
        print(f"afkern-train predict: {len(preds)} predictions -> {cfg.out}")
    return {"predictions": preds}
