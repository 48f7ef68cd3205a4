"""Task data for ``afkern-train``: local CSV / TSV / JSON / JSONL files and Hugging Face ``datasets``
(optional), read into :class:`TaskData` with label ids in ``[0, num_labels)``.

A task is a list of examples with a text column (and an optional second segment) and a label
column. Labels may be names (ids in sorted order of the training labels, or in the order of
``label_names``) or integer class ids (``3``, ``"3"`` and ``3.0`` are all id 3). Every problem is a
:class:`DataError` raised while loading, before any training starts, naming the file and the
line (JSON lists, JSONL, CSV, TSV) or record of the bad example. The label map is built from the
whole training file *before* a dev set is held out of it, so no label can hide in the held-out part.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import os
import random
import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .._io import atomic_write_bytes
from .errors import DataError

__all__ = ["DataError", "TaskData", "read_records", "read_table", "load_task", "parse_task_spec", "write_jsonl",
           "data_fingerprint"]

EXTS = (".csv", ".tsv", ".jsonl", ".json")
_INT_RE = re.compile(r"[+-]?\d+(?:\.0*)?")
_FLOAT_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


@dataclass
class TaskData:
    """One classification task: train and dev examples with label ids in ``[0, num_labels)``."""

    name: str
    label_names: List[str]
    train_text: List[str]
    train_labels: List[int]
    dev_text: List[str]
    dev_labels: List[int]
    train_pair: Optional[List[str]] = None
    dev_pair: Optional[List[str]] = None
    source: str = ""
    generated: bool = False
    info: Dict[str, object] = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def summary(self) -> str:
        tag = " [GENERATED]" if self.generated else ""
        return (f"{self.name}{tag}: {len(self.train_text)} train / {len(self.dev_text)} dev examples, "
                f"{self.num_labels} labels {self.label_names}" + (" (text pairs)" if self.train_pair else ""))

    def fingerprint(self) -> str:
        """sha256 of the examples and labels of both splits (see :func:`data_fingerprint`)."""
        return data_fingerprint(self)


def data_fingerprint(task: TaskData) -> str:
    """Content hash of what a run trains and selects on: label names, and the train and dev texts,
    text pairs and label ids in order. Where the data came from (path, format) does not enter it."""
    payload = [task.label_names, task.train_text, task.train_pair, task.train_labels,
               task.dev_text, task.dev_pair, task.dev_labels]
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------- readers
def _delimiter(path: str, ext: str, header: str) -> str:
    if ext == ".tsv":
        return "\t"
    # a .csv that is really tab-separated (a common export): the header decides
    return "\t" if header.count("\t") > header.count(",") else ","


def _read_delimited(path: str, ext: str, raw: str) -> Tuple[List[dict], List[str]]:
    header = next((ln for ln in raw.splitlines() if ln.strip()), "")
    delim = _delimiter(path, ext, header)
    # TSV files (GLUE's among them) do not quote: a text that starts with a quote must not open a
    # quoted field that swallows the next lines. Fields wrapped whole in quotes are unwrapped.
    quoting = csv.QUOTE_NONE if delim == "\t" else csv.QUOTE_MINIMAL
    reader = csv.DictReader(io.StringIO(raw, newline=""), delimiter=delim, quoting=quoting)
    if not reader.fieldnames or not any(f and f.strip() for f in reader.fieldnames):
        raise DataError(f"{path} has no header row")
    if delim == "\t":
        reader.fieldnames = [_unquote(f) for f in reader.fieldnames]
    fix = "a text field contains a tab" if delim == "\t" else "quote fields that contain a comma"
    rows, locs = [], []
    for row in reader:
        loc = f"{path} line {reader.line_num}"
        if None in row:  # more fields than the header
            raise DataError(f"{loc}: {len(reader.fieldnames) + len(row[None])} fields, the header has "
                            f"{len(reader.fieldnames)} ({reader.fieldnames}); {fix}?")
        rows.append({k: _unquote(v) for k, v in row.items()} if delim == "\t" else dict(row))
        locs.append(loc)
    return rows, locs


def _unquote(v):
    if isinstance(v, str) and len(v) >= 2 and v[0] == v[-1] == '"':
        return v[1:-1].replace('""', '"')
    return v


def _json_list_lines(raw: str, n: int) -> Optional[List[int]]:
    """Line numbers where the items of a top-level JSON array start (None if not such an array)."""
    dec, ws = json.JSONDecoder(), " \t\r\n"
    i = len(raw) - len(raw.lstrip(ws))
    if i >= len(raw) or raw[i] != "[":
        return None
    i += 1
    lines, line, last = [], 1, 0
    try:
        while True:
            while raw[i] in ws:
                i += 1
            if raw[i] == "]":
                break
            line += raw.count("\n", last, i)
            last = i
            lines.append(line)
            _, i = dec.raw_decode(raw, i)
            while raw[i] in ws:
                i += 1
            if raw[i] == ",":
                i += 1
    except (IndexError, ValueError):
        return None
    return lines if len(lines) == n else None


def read_table(path: str) -> Tuple[List[dict], List[str]]:
    """Rows of a data file and, per row, where it is (``"<path> line 7"``, or ``"<path> record 3"``
    for a JSON dict of columns). CSV and TSV need a header row (a ``.csv`` whose header has more
    tabs than commas is read as TSV); JSONL has one object a line; JSON is a list of objects, a
    ``{"data": [...]}`` wrapper, or a dict of equal-length columns."""
    if not os.path.isfile(path):
        raise DataError(f"data file {path} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTS:
        raise DataError(f"{path}: unsupported data file type {ext!r}; expected one of {list(EXTS)}")
    try:
        with open(path, encoding="utf-8-sig") as f:
            raw = f.read()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text: {exc}") from None
    if not raw.strip():
        raise DataError(f"{path} is empty; expected a header row and examples" if ext in (".csv", ".tsv")
                        else f"{path} is empty; expected examples")
    if ext in (".csv", ".tsv"):
        rows, locs = _read_delimited(path, ext, raw)
    elif ext == ".jsonl":
        rows, locs = [], []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {i} is not valid JSON: {exc}") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path} line {i}: expected a JSON object per line, got {type(obj).__name__}")
            rows.append(obj)
            locs.append(f"{path} line {i}")
    else:
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON: {exc}") from None
        lines = None
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            obj = obj["data"]
        elif isinstance(obj, list):
            lines = _json_list_lines(raw, len(obj))
        if isinstance(obj, dict):  # columns
            lens = {k: len(v) for k, v in obj.items() if isinstance(v, list)}
            if not lens or len(set(lens.values())) != 1 or len(lens) != len(obj):
                raise DataError(f"{path}: a JSON object must map column names to lists of equal length, got {lens}")
            n = next(iter(lens.values()))
            rows = [{k: obj[k][i] for k in obj} for i in range(n)]
            locs = [f"{path} record {i + 1}" for i in range(n)]
        elif isinstance(obj, list):
            locs = [f"{path} line {ln}" for ln in lines] if lines else [f"{path} record {i + 1}" for i in range(len(obj))]
            bad = next((i for i, r in enumerate(obj) if not isinstance(r, dict)), None)
            if bad is not None:
                raise DataError(f"{locs[bad]}: expected a JSON object, got {type(obj[bad]).__name__}")
            rows = obj
        else:
            raise DataError(f"{path}: expected a list of objects or a dict of columns, got {type(obj).__name__}")
    if not rows:
        raise DataError(f"{path} has no examples")
    return rows, locs


def read_records(path: str) -> List[dict]:
    """The rows of a data file (see :func:`read_table`)."""
    return read_table(path)[0]


# ----------------------------------------------------------------------------------- columns and labels
def read_texts(rows: List[dict], locs: List[str], text_col: str, pair_col: Optional[str]):
    """(texts, pairs or None) of ``rows``: every row's non-empty ``text_col`` and, when ``pair_col``
    is given, its text ``pair_col``; DataError naming the row's file and line."""
    text, pair = [], [] if pair_col is not None else None
    for r, loc in zip(rows, locs):
        t = r.get(text_col)
        if not isinstance(t, str) or not t.strip():
            raise DataError(f"{loc}: empty or non-text {text_col!r} ({t!r})")
        text.append(t)
        if pair is not None:
            p = r.get(pair_col)
            if not isinstance(p, str):
                raise DataError(f"{loc}: non-text {pair_col!r} ({p!r})")
            pair.append(p)
    return text, pair


def _columns(rows: List[dict], locs: List[str], where: str, text_col: str, pair_col: Optional[str], label_col: str):
    present = set(rows[0])
    need = [text_col, label_col]
    missing = [c for c in need if c not in present]
    if missing:
        flags = " / ".join(f for c, f in ((text_col, "--text-column"), (label_col, "--label-column")) if c in missing)
        raise DataError(f"{where}: missing column(s) {missing}; expected columns {need} (and optionally {pair_col!r}), "
                        f"found {sorted(map(str, present))}; if the data uses other names, pass {flags} NAME")
    text, pair = read_texts(rows, locs, text_col, pair_col if pair_col in present else None)
    labels = []
    for r, loc in zip(rows, locs):
        lab = r.get(label_col)
        if lab is None or (isinstance(lab, str) and not lab.strip()):
            raise DataError(f"{loc}: no {label_col!r}")
        labels.append(lab)
    return text, pair, labels


def _int_label(v) -> Optional[int]:
    """The class id of an integer-valued label (``3``, ``"3"``, ``3.0``, ``"3.0"``), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return int(v) if v.is_integer() else None
    if isinstance(v, str) and _INT_RE.fullmatch(v.strip()):
        return int(v.strip().split(".")[0])
    return None


def _is_number(v) -> bool:
    if isinstance(v, bool):
        return False
    return isinstance(v, (int, float)) or (isinstance(v, str) and bool(_FLOAT_RE.fullmatch(v.strip())))


def _label_map(labels: Sequence, locs: Sequence[str], label_names: Optional[Sequence[str]], num_labels: Optional[int],
               where: str) -> Tuple[List[str], Optional[Dict[str, int]]]:
    """(names, table) for a task. ``table`` None: integer class ids; else name -> id."""
    if label_names:
        names = [str(n) for n in label_names]
        if num_labels is not None and num_labels != len(names):
            raise DataError(f"{where}: --num-labels {num_labels} disagrees with {len(names)} label names {names}")
        return names, {n: i for i, n in enumerate(names)}
    ids = [_int_label(v) for v in labels]
    if all(k is not None for k in ids):
        n = num_labels if num_labels is not None else max(ids) + 1
        return [str(i) for i in range(n)], None
    if all(_is_number(v) for v in labels):
        i = next(i for i, k in enumerate(ids) if k is None)
        raise DataError(f"{locs[i]}: label {labels[i]!r} is not a whole number; afkern-train trains classifiers, so "
                        "labels must be class ids (0, 1, 2 or 0.0, 1.0, ...) or names")
    names = sorted({str(v) for v in labels})
    if num_labels is not None and num_labels != len(names):
        raise DataError(f"{where}: the training labels are {len(names)} names {names} but --num-labels is {num_labels}")
    return names, {n: i for i, n in enumerate(names)}


def _to_ids(labels: Sequence, locs: Sequence[str], names: List[str], table: Optional[Dict[str, int]]) -> List[int]:
    out = []
    for v, loc in zip(labels, locs):
        if table is None:
            k = _int_label(v)
            if k is None:
                raise DataError(f"{loc}: label {v!r}, but this task uses integer labels 0..{len(names) - 1}")
            if not 0 <= k < len(names):
                raise DataError(f"{loc}: label {k}, outside the classification head's {len(names)} labels "
                                f"(0..{len(names) - 1}); set --num-labels or fix the data")
        else:
            k = table.get(str(v))
            if k is None:  # a class id of a dataset with label names (HF ClassLabel)
                j = _int_label(v)
                k = j if j is not None and 0 <= j < len(names) else None
            if k is None:
                raise DataError(f"{loc}: label {v!r}, outside the classification head's labels {names}")
        out.append(k)
    return out


# ----------------------------------------------------------------------------------- sources
def _find_split(directory: str, stems: Sequence[str]) -> Optional[str]:
    for stem in stems:
        for ext in EXTS:
            p = os.path.join(directory, stem + ext)
            if os.path.isfile(p):
                return p
    return None


def _load_hf(spec: str, where: str, dev_split: Optional[str]):
    """(train rows, dev rows, label names) of ``hf:NAME[:CONFIG]`` or ``disk:PATH``."""
    if importlib.util.find_spec("datasets") is None:
        raise DataError(f"{where}: reading {spec!r} needs the Hugging Face `datasets` package, which is not installed "
                        "(pip install datasets), or give a local CSV / TSV / JSON / JSONL file")
    import datasets  # optional dependency

    if spec.startswith("disk:"):
        ds = datasets.load_from_disk(spec[5:])
    else:
        name, _, config = spec[3:].partition(":")
        ds = datasets.load_dataset(name, config) if config else datasets.load_dataset(name)
    if not isinstance(ds, Mapping):
        raise DataError(f"{where}: {spec} is a single split; expected a DatasetDict with a train split")
    if "train" not in ds:
        raise DataError(f"{where}: {spec} has splits {list(ds)}, no 'train'")
    cands = [dev_split] if dev_split else ["validation", "dev", "validation_matched", "test"]
    dev = next((s for s in cands if s in ds), None)
    if dev is None:
        raise DataError(f"{where}: {spec} has no dev split among {cands} (splits: {list(ds)})")
    feat = ds["train"].features.get("label") if hasattr(ds["train"], "features") else None
    names = list(getattr(feat, "names", []) or [])
    return [dict(r) for r in ds["train"]], [dict(r) for r in ds[dev]], names, dev


def parse_task_spec(spec: str) -> Tuple[str, str]:
    """``NAME=SOURCE`` -> (name, source)."""
    if "=" not in spec:
        raise DataError(f"task {spec!r}: expected NAME=PATH (a CSV/TSV/JSON/JSONL file or a folder with train.* and dev.*), "
                        "NAME=hf:DATASET[:CONFIG] or NAME=disk:PATH")
    name, src = spec.split("=", 1)
    name = name.strip()
    if not name or any(c in name for c in ",/\\ "):
        raise DataError(f"task {spec!r}: the task name must be non-empty without ',', '/', '\\' or spaces")
    if not src:
        raise DataError(f"task {spec!r}: no data source after '='")
    return name, src


def load_task(name: str, source: str, dev_source: Optional[str] = None, *, text_column: str = "text",
              text_pair_column: Optional[str] = "text_pair", label_column: str = "label",
              label_names: Optional[Sequence[str]] = None, num_labels: Optional[int] = None,
              dev_fraction: float = 0.1, dev_split: Optional[str] = None, seed: int = 0) -> TaskData:
    """Load a task from a file, a folder (``train.*`` plus ``dev.*`` / ``validation.*``), or
    ``hf:NAME[:CONFIG]`` / ``disk:PATH`` (needs ``datasets``). Without a dev source, ``dev_fraction``
    of the training examples (seeded) is held out, after every label was checked and mapped."""
    where = f"task {name!r}"
    hf_names: List[str] = []
    dev_rows = dev_locs = None
    if source.startswith(("hf:", "disk:")):
        train_rows, dev_rows, hf_names, dev_name = _load_hf(source, where, dev_split)
        train_where, dev_where = f"{where} ({source} train)", f"{where} ({source} {dev_name})"
        train_locs = [f"{source} train row {i}" for i in range(len(train_rows))]
        dev_locs = [f"{source} {dev_name} row {i}" for i in range(len(dev_rows))]
    else:
        train_path = source
        if os.path.isdir(source):
            train_path = _find_split(source, ["train"])
            if train_path is None:
                raise DataError(f"{where}: folder {source} has no train.csv / train.tsv / train.jsonl / train.json")
            if dev_source is None:
                dev_source = _find_split(source, ["dev", "validation", "valid"])
        train_rows, train_locs = read_table(train_path)
        train_where = f"{where} ({train_path})"
        if dev_source is not None:
            dev_rows, dev_locs = read_table(dev_source)
            dev_where = f"{where} ({dev_source})"
    text, pair, raw_labels = _columns(train_rows, train_locs, train_where, text_column, text_pair_column, label_column)
    names, table = _label_map(raw_labels, train_locs, label_names or hf_names or None, num_labels, train_where)
    labels = _to_ids(raw_labels, train_locs, names, table)
    if dev_rows is None:
        if not 0.0 < dev_fraction < 1.0:
            raise DataError(f"{where}: no dev set given and dev_fraction={dev_fraction} is not in (0, 1)")
        n_dev = max(1, int(round(len(text) * dev_fraction)))
        if len(text) - n_dev < 1:
            raise DataError(f"{where}: {len(text)} examples are too few to hold out a dev set; give a dev file")
        order = list(range(len(text)))
        random.Random(seed).shuffle(order)
        dev_idx, tr_idx = sorted(order[:n_dev]), sorted(order[n_dev:])

        def pick(xs, idx):
            return None if xs is None else [xs[i] for i in idx]

        d_text, d_pair, d_labels = pick(text, dev_idx), pick(pair, dev_idx), pick(labels, dev_idx)
        text, pair, labels = pick(text, tr_idx), pick(pair, tr_idx), pick(labels, tr_idx)
    else:
        d_text, d_pair, d_raw = _columns(dev_rows, dev_locs, dev_where, text_column, text_pair_column, label_column)
        if (pair is None) != (d_pair is None):
            raise DataError(f"{where}: column {text_pair_column!r} is in only one of train and dev")
        d_labels = _to_ids(d_raw, dev_locs, names, table)
    return TaskData(name=name, label_names=names, train_text=text, train_labels=labels, train_pair=pair,
                    dev_text=d_text, dev_labels=d_labels, dev_pair=d_pair, source=source)


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    """Write rows as JSONL, atomically."""
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8"))
