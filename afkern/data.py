"""Data for ``afkern-train``: local CSV / JSON / JSONL files, Hugging Face ``datasets`` (optional),
and the GENERATED demo tasks of ``afkern-train demo``.

A task is a list of examples with a ``text`` column (and an optional second segment,
``text_pair``) and a ``label`` column. Labels may be names (mapped to ids in sorted order of the
training labels, or in the order given by ``label_names``) or non-negative integers (used as ids).
Every problem with the input is a :class:`DataError` (a ``ValueError``) that names the file, the
column and what was expected, raised while loading, before any training starts.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "DataError",
    "TaskData",
    "read_records",
    "load_task",
    "parse_task_spec",
    "make_demo_tasks",
    "demo_vocabulary",
    "write_jsonl",
    "GENERATED_NOTE",
]

GENERATED_NOTE = (
    "GENERATED data: synthetic sentences built from word lists by seeded rules "
    "(afkern.data.make_demo_tasks); not a real benchmark, accuracies say nothing about real tasks"
)

_EXTS = (".csv", ".jsonl", ".json")


class DataError(ValueError):
    """Bad training data: missing file or column, empty file, unknown label."""


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


# ----------------------------------------------------------------------------------- readers
def read_records(path: str) -> List[dict]:
    """Rows of a CSV (header row), JSONL (one object a line) or JSON file (a list of objects, a
    ``{"data": [...]}`` wrapper, or a dict of equal-length columns)."""
    if not os.path.isfile(path):
        raise DataError(f"data file {path} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext not in _EXTS:
        raise DataError(f"{path}: unsupported data file type {ext!r}; expected one of {list(_EXTS)}")
    with open(path, encoding="utf-8") as f:
        raw = f.read()
    if not raw.strip():
        raise DataError(f"{path} is empty; expected a header row and examples" if ext == ".csv" else f"{path} is empty; expected examples")
    if ext == ".csv":
        reader = csv.DictReader(raw.splitlines())
        if not reader.fieldnames:
            raise DataError(f"{path} has no header row")
        rows = [dict(r) for r in reader]
    elif ext == ".jsonl":
        rows = []
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
    else:
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON: {exc}") from None
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            obj = obj["data"]
        if isinstance(obj, dict):  # columns
            lens = {k: len(v) for k, v in obj.items() if isinstance(v, list)}
            if not lens or len(set(lens.values())) != 1 or len(lens) != len(obj):
                raise DataError(f"{path}: a JSON object must map column names to lists of equal length, got {lens}")
            n = next(iter(lens.values()))
            rows = [{k: obj[k][i] for k in obj} for i in range(n)]
        elif isinstance(obj, list):
            if not all(isinstance(r, dict) for r in obj):
                raise DataError(f"{path}: expected a list of JSON objects")
            rows = obj
        else:
            raise DataError(f"{path}: expected a list of objects or a dict of columns, got {type(obj).__name__}")
    if not rows:
        raise DataError(f"{path} has no examples")
    return rows


def _columns(rows: List[dict], where: str, text_col: str, pair_col: Optional[str], label_col: str):
    present = set(rows[0])
    need = [text_col, label_col]
    missing = [c for c in need if c not in present]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing}; expected columns {need} "
                        f"(and optionally {pair_col!r}), found {sorted(present)}")
    use_pair = pair_col is not None and pair_col in present
    text, pair, labels = [], [] if use_pair else None, []
    for i, r in enumerate(rows):
        t = r.get(text_col)
        if not isinstance(t, str) or not t.strip():
            raise DataError(f"{where}: example {i} has an empty or non-text {text_col!r} ({t!r})")
        text.append(t)
        if use_pair:
            p = r.get(pair_col)
            if not isinstance(p, str):
                raise DataError(f"{where}: example {i} has a non-text {pair_col!r} ({p!r})")
            pair.append(p)
        lab = r.get(label_col)
        if lab is None or (isinstance(lab, str) and not lab.strip()):
            raise DataError(f"{where}: example {i} has no {label_col!r}")
        labels.append(lab)
    return text, pair, labels


def _is_int_label(v) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    return isinstance(v, str) and v.strip().lstrip("-").isdigit()


def _label_map(train_labels: Sequence, label_names: Optional[Sequence[str]], num_labels: Optional[int], where: str):
    """(names, to_id) for a task. Integer labels are ids; names are mapped in sorted order."""
    if label_names:
        names = [str(n) for n in label_names]
        if num_labels is not None and num_labels != len(names):
            raise DataError(f"{where}: --num-labels {num_labels} disagrees with {len(names)} label names {names}")
        table = {n: i for i, n in enumerate(names)}
        return names, table
    if all(_is_int_label(v) for v in train_labels):
        ids = [int(v) for v in train_labels]
        n = num_labels if num_labels is not None else max(ids) + 1
        return [str(i) for i in range(n)], None
    names = sorted({str(v) for v in train_labels})
    if num_labels is not None and num_labels != len(names):
        raise DataError(f"{where}: the training labels are {len(names)} names {names} but --num-labels is {num_labels}")
    return names, {n: i for i, n in enumerate(names)}


def _to_ids(labels: Sequence, names: List[str], table: Optional[Dict[str, int]], where: str) -> List[int]:
    out = []
    for i, v in enumerate(labels):
        if table is None:
            if not _is_int_label(v):
                raise DataError(f"{where}: example {i} has label {v!r} but this task uses integer labels 0..{len(names) - 1}")
            k = int(v)
            if not 0 <= k < len(names):
                raise DataError(f"{where}: example {i} has label {k}, outside the classification head's "
                                f"{len(names)} labels (0..{len(names) - 1}); set --num-labels or fix the data")
        else:
            k = table.get(str(v))
            if k is None:
                raise DataError(f"{where}: example {i} has label {v!r}, outside the classification head's labels "
                                f"{names}")
        out.append(k)
    return out


def _find_split(directory: str, stems: Sequence[str]) -> Optional[str]:
    for stem in stems:
        for ext in _EXTS:
            p = os.path.join(directory, stem + ext)
            if os.path.isfile(p):
                return p
    return None


def _load_hf(spec: str, where: str, dev_split: Optional[str]):
    """Rows of the train and dev splits of ``hf:NAME[:CONFIG]`` or ``disk:PATH``."""
    if importlib.util.find_spec("datasets") is None:
        raise DataError(f"{where}: reading {spec!r} needs the Hugging Face `datasets` package, which is not installed "
                        "(pip install datasets), or give a local CSV / JSON / JSONL file")
    import datasets  # noqa: WPS433 (optional dependency)

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
    train_rows = [dict(r) for r in ds["train"]]
    dev_rows = [dict(r) for r in ds[dev]]
    feat = ds["train"].features.get("label") if hasattr(ds["train"], "features") else None
    names = list(getattr(feat, "names", []) or [])
    return train_rows, dev_rows, names


def parse_task_spec(spec: str) -> Tuple[str, str]:
    """``NAME=SOURCE`` -> (name, source)."""
    if "=" not in spec:
        raise DataError(f"task {spec!r}: expected NAME=PATH (a CSV/JSON/JSONL file or a folder with train.* and dev.*), "
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
    of the training examples (seeded) is held out."""
    where = f"task {name!r}"
    hf_names: List[str] = []
    if source.startswith(("hf:", "disk:")):
        train_rows, dev_rows, hf_names = _load_hf(source, where, dev_split)
        train_where, dev_where = f"{where} ({source} train)", f"{where} ({source} dev)"
    else:
        train_path = source
        if os.path.isdir(source):
            train_path = _find_split(source, ["train"])
            if train_path is None:
                raise DataError(f"{where}: folder {source} has no train.csv / train.jsonl / train.json")
            if dev_source is None:
                dev_source = _find_split(source, ["dev", "validation", "valid"])
        train_rows = read_records(train_path)
        train_where = f"{where} ({train_path})"
        dev_rows, dev_where = None, None
        if dev_source is not None:
            dev_rows = read_records(dev_source)
            dev_where = f"{where} ({dev_source})"
    text, pair, labels = _columns(train_rows, train_where, text_column, text_pair_column, label_column)
    if dev_rows is None:
        if not 0.0 < dev_fraction < 1.0:
            raise DataError(f"{where}: no dev set given and dev_fraction={dev_fraction} is not in (0, 1)")
        n_dev = max(1, int(round(len(text) * dev_fraction)))
        if len(text) - n_dev < 1:
            raise DataError(f"{where}: {len(text)} examples are too few to hold out a dev set; give a dev file")
        order = list(range(len(text)))
        random.Random(seed).shuffle(order)
        dev_idx, tr_idx = sorted(order[:n_dev]), sorted(order[n_dev:])
        pick = lambda xs, idx: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        d_text, d_pair, d_labels = pick(text, dev_idx), pick(pair, dev_idx), pick(labels, dev_idx)
        text, pair, labels = pick(text, tr_idx), pick(pair, tr_idx), pick(labels, tr_idx)
        dev_where = f"{train_where} held-out dev"
    else:
        d_text, d_pair, d_labels = _columns(dev_rows, dev_where, text_column, text_pair_column, label_column)
        if (pair is None) != (d_pair is None):
            raise DataError(f"{where}: column {text_pair_column!r} is in only one of train and dev")
    names, table = _label_map(labels, label_names or hf_names or None, num_labels, train_where)
    return TaskData(
        name=name, label_names=names,
        train_text=text, train_labels=_to_ids(labels, names, table, train_where), train_pair=pair,
        dev_text=d_text, dev_labels=_to_ids(d_labels, names, table, dev_where), dev_pair=d_pair,
        source=source,
    )


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    """Write rows as JSONL, atomically."""
    from ._io import atomic_write_bytes

    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8"))


# ----------------------------------------------------------------------------------- demo tasks
_TOPICS = {
    "sports": ["football", "match", "goal", "team", "coach", "stadium", "tennis", "player", "race", "league",
               "referee", "season"],
    "food": ["pizza", "soup", "bread", "chef", "recipe", "dinner", "cheese", "salad", "dessert", "restaurant",
             "coffee", "noodles"],
    "science": ["experiment", "telescope", "molecule", "laboratory", "physics", "research", "planet", "theory",
                "microscope", "chemistry", "data", "scientist"],
    "travel": ["flight", "hotel", "beach", "passport", "train", "island", "museum", "airport", "luggage", "mountain",
               "tour", "harbor"],
}
_POS = ["wonderful", "great", "excellent", "delightful", "amazing", "superb", "pleasant", "fantastic", "lovely",
        "brilliant"]
_NEG = ["terrible", "awful", "horrible", "disappointing", "dreadful", "poor", "boring", "nasty", "miserable",
        "annoying"]
_NEUTRAL = ["new", "old", "big", "small", "local", "usual", "second", "long"]
_SUBJ = ["my friend", "the reviewer", "our group", "a neighbour", "my sister", "the visitor", "everyone", "the author",
         "my colleague", "the guide"]
_VERB = ["said", "thought", "felt", "wrote", "claimed", "noted", "told us"]
_TAIL = ["today", "this week", "again", "last night", "at last", "as usual", "once more", "yesterday", "", ""]
_OTHER = ["weather", "street", "book", "phone", "garden", "office", "meeting", "window"]


def demo_vocabulary() -> List[str]:
    """Every word the demo generator can emit (for building a tiny tokenizer in tests)."""
    words = set()
    for ws in list(_TOPICS.values()) + [_POS, _NEG, _NEUTRAL, _SUBJ, _VERB, _TAIL, _OTHER]:
        for w in ws:
            words.update(w.split())
    words.update("the was were and a what did seem is it really honestly felt , ? .".split())
    words.update(["about", "how", "was", "were", "not", "quite"])
    return sorted(words)


def _sentence(rng: random.Random, nouns: Sequence[str], adj: str, question: bool = False) -> str:
    n1, n2 = rng.choice(nouns), rng.choice(nouns + _OTHER)
    subj, verb, tail = rng.choice(_SUBJ), rng.choice(_VERB), rng.choice(_TAIL)
    if question:
        t = rng.choice([
            f"did {subj} think the {n1} was {adj} ?",
            f"was the {n1} really {adj} {tail} ?",
            f"how {adj} was the {n1} and the {n2} ?",
            f"is it {adj} about the {n1} ?",
        ])
    else:
        t = rng.choice([
            f"{subj} {verb} the {n1} was {adj} {tail} .",
            f"the {n1} and the {n2} were {adj} .",
            f"what a {adj} {n1} {tail} .",
            f"honestly the {n1} felt {adj} {tail} .",
            f"{subj} {verb} it was a {adj} {n1} near the {n2} .",
        ])
    return " ".join(t.split())


def make_demo_tasks(seed: int = 0, quick: bool = False) -> Tuple[List[TaskData], TaskData]:
    """GENERATED classification tasks: (source tasks, target task).

    Sources (different sizes): ``topic`` (4 topics: sports/food/science/travel; the adjective is
    noise), ``sentiment`` (positive/negative adjective; the topic is noise), ``question`` (question
    or statement; unrelated to the target, a distractor). Target ``routing`` (small): 4 labels that
    combine a topic group (outdoor = sports/travel, indoor = food/science) with the sentiment, so it
    is related to ``topic`` and ``sentiment`` and AdapterFusion can transfer from them.
    """
    rng = random.Random(seed)
    topics = list(_TOPICS)
    sizes = dict(topic=(320, 96), sentiment=(256, 96), question=(64, 96), routing=(24, 160)) if quick else \
        dict(topic=(2000, 400), sentiment=(1500, 400), question=(600, 400), routing=(96, 400))

    def sample(task: str):
        pol = rng.random() < 0.5
        adj = rng.choice(_POS if pol else _NEG)
        topic = rng.choice(topics)
        if task == "topic":
            if rng.random() < 0.3:
                adj = rng.choice(_NEUTRAL)
            return _sentence(rng, _TOPICS[topic], adj, question=rng.random() < 0.2), topic
        if task == "sentiment":
            return _sentence(rng, _TOPICS[topic], adj, question=False), "positive" if pol else "negative"
        if task == "question":
            q = rng.random() < 0.5
            adj = rng.choice(_POS + _NEG + _NEUTRAL)
            return _sentence(rng, _TOPICS[topic], adj, question=q), "question" if q else "statement"
        group = "outdoor" if topic in ("sports", "travel") else "indoor"
        return _sentence(rng, _TOPICS[topic], adj, question=False), f"{group}_{'praise' if pol else 'complaint'}"

    out = []
    for task, (n_train, n_dev) in sizes.items():
        train = [sample(task) for _ in range(n_train)]
        dev = [sample(task) for _ in range(n_dev)]
        names = sorted({lab for _, lab in train + dev})
        ids = {n: i for i, n in enumerate(names)}
        out.append(TaskData(
            name=task, label_names=names,
            train_text=[t for t, _ in train], train_labels=[ids[lab] for _, lab in train],
            dev_text=[t for t, _ in dev], dev_labels=[ids[lab] for _, lab in dev],
            source=f"generated(seed={seed}, quick={quick})", generated=True,
        ))
    return out[:-1], out[-1]
