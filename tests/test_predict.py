"""``afkern-train predict`` / :func:`afkern.train.predict`: new texts through the classifiers of a
finished run, several tasks routed in one batch, against each task's own classifier
(:func:`afkern.train.load_classifier`) run alone; bad input; atomic output."""

from __future__ import annotations

import json
import os

import pytest
import torch

from afkern import train as T
from afkern.train import DataError, TrainError, load_classifier, read_records
from afkern.train.batches import Encoded
from afkern.train.predict import Predictor, find_task, read_inputs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TASKS = ["routing", "sentiment", "adapter:routing", "topic"]  # two fusions, two stage-1 classifiers


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from test_train import _tiny_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this module's comparisons run on one thread; restored after it
    root = tmp_path_factory.mktemp("predict")
    model = _tiny_model(root / "m")
    out = str(root / "out")
    common = ["--model", model, "--output-dir", out, "--no-progress", "--no-heatmap", "--backend", "torch"]
    T.run(["demo", "--quick", *common, "--adapter-epochs", "1", "--fusion-epochs", "1"])
    # a second fusion target over the same adapters: two fusions to route between
    T.run(["fusion", *common, "--task", f"sentiment={out}/data/sentiment", "--adapters", f"{out}/adapters",
           "--epochs", "1", "--max-length", "24", "--batch-size", "16"])
    rows = []
    for i, spec in enumerate(TASKS * 3):  # tasks interleaved, a dev text of each
        name = spec.split(":")[-1]
        text = read_records(os.path.join(out, "data", name, "dev.jsonl"))[i]["text"]
        rows.append({"text": text, "task": spec})
    yield {"model": model, "out": out, "rows": rows}
    torch.set_num_threads(threads)


def _alone(run_dir, spec, texts, dtype, pairs=None):
    """The task's own classifier (load_classifier), the texts in one batch: softmax [n, labels]."""
    f = find_task(run_dir["out"], spec)
    clf = load_classifier(run_dir["model"], list(f.adapters.values()), f.head_dir, f.fusion_dir, backend="torch").to(dtype)
    tok = T.load_tokenizer(run_dir["model"])
    enc = Encoded(tok, texts, pairs, [0] * len(texts), int(f.run["settings"]["max_length"]))
    with torch.no_grad():
        return torch.softmax(clf(**enc.batch(range(len(texts)), "cpu")).double(), -1)


def test_routed_batch_equals_each_task_alone_float64(run_dir):
    rows = run_dir["rows"]
    pred = Predictor(run_dir["out"], TASKS, dtype=torch.float64, batch_size=5, backend="torch")  # batches mix tasks
    got = pred.predict([r["text"] for r in rows], [r["task"] for r in rows])
    spread = []
    for spec in TASKS:
        idx = [i for i, r in enumerate(rows) if r["task"] == spec]
        ref = _alone(run_dir, spec, [rows[i]["text"] for i in idx], torch.float64)
        labels = pred.label_names(spec)
        for i, p in zip(idx, ref):
            assert got[i]["task"] == spec and got[i]["label"] == labels[int(p.argmax())]
            assert got[i]["probability"] == pytest.approx(float(p.max()), abs=1e-9)
            assert [got[i]["probabilities"][n] for n in labels] == pytest.approx(p.tolist(), abs=1e-9)
            spread.append(float(p.max() - p.min()))
    assert min(spread) < 0.99 and max(spread) > 1e-3  # neither one-hot nor uniform: the scores matter
    # the fusion and the single adapter of "routing" are different classifiers
    a, b = (next(g for g, r in zip(got, rows) if r["task"] == s) for s in ("routing", "adapter:routing"))
    assert a["probabilities"] != b["probabilities"]


def test_cli_and_python_call_agree_and_match_alone_float32(run_dir, tmp_path, capsys):
    rows = run_dir["rows"]
    src = tmp_path / "new.csv"
    src.write_text("task,text\n" + "".join(f"{r['task']},\"{r['text']}\"\n" for r in rows))
    dst = tmp_path / "pred.jsonl"
    args = ["predict", "--output-dir", run_dir["out"], str(src), "--out", str(dst), "--backend", "torch"]
    assert T.main(args + sum((["--task", t] for t in TASKS), [])) == 0
    lines = [json.loads(x) for x in dst.read_text().splitlines()]
    assert len(lines) == len(rows) and all(set(x) == {"task", "label", "probability", "probabilities"} for x in lines)
    py = T.predict(run_dir["out"], TASKS, str(src), backend="torch")
    assert [x["label"] for x in lines] == [x["label"] for x in py]
    assert [x["probability"] for x in lines] == pytest.approx([x["probability"] for x in py], rel=1e-6)
    exact = Predictor(run_dir["out"], TASKS, dtype=torch.float64, backend="torch").predict(
        [r["text"] for r in rows], [r["task"] for r in rows])
    for spec in TASKS:  # float32: the alone run's argmax, wherever float64 has a margin
        idx = [i for i, r in enumerate(rows) if r["task"] == spec]
        ref = _alone(run_dir, spec, [rows[i]["text"] for i in idx], torch.float32)
        for i, p in zip(idx, ref):
            top2 = sorted(exact[i]["probabilities"].values())[-2:]
            if top2[1] - top2[0] > 1e-4:
                assert lines[i]["label"] == py[i]["label"] == exact[i]["label"]
                assert lines[i]["label"] == find_task(run_dir["out"], spec).label_names[int(p.argmax())]
    # one task, a plain list of texts, CSV out
    out_csv = tmp_path / "one.csv"
    one = T.predict(run_dir["out"], "topic", [r["text"] for r in rows[:3]], out=str(out_csv), backend="torch")
    body = out_csv.read_text().splitlines()
    assert body[0] == "task,label,probability" and len(body) == 4 and body[1].startswith(f"topic,{one[0]['label']},")


def _err(capsys, argv):
    assert T.main(argv) == 2
    return capsys.readouterr().err


def test_bad_input_names_file_and_line(run_dir, tmp_path, capsys):
    out = run_dir["out"]
    base = ["predict", "--output-dir", out, "--backend", "torch"]
    good = tmp_path / "ok.jsonl"
    good.write_text('{"text": "fine", "task": "topic"}\n')
    e = _err(capsys, base + ["--task", "nosuch", str(good)])
    assert "unknown task 'nosuch'" in e and "routing" in e and "sentiment" in e and "adapter:routing" in e
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert f"{empty} is empty" in _err(capsys, base + ["--task", "topic", str(empty)])
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("sentence\nhello\n")
    e = _err(capsys, base + ["--task", "topic", str(nocol)])
    assert str(nocol) in e and "'text'" in e and "--text-column" in e
    badtask = tmp_path / "bad.jsonl"
    badtask.write_text('{"text": "a", "task": "topic"}\n\n{"text": "b", "task": "sentiments"}\n')
    e = _err(capsys, base + ["--task", "topic", "--task", "sentiment", str(badtask)])
    assert f"{badtask} line 3" in e and "'sentiments'" in e
    notask = tmp_path / "notask.csv"
    notask.write_text("text\nhello\n")
    assert "--task-column" in _err(capsys, base + ["--task", "topic", "--task", "sentiment", str(notask)])
    blank = tmp_path / "blank.csv"
    blank.write_text("text\nhello\n\"  \"\n")
    assert f"{blank} line 3" in _err(capsys, base + ["--task", "topic", str(blank)])
    with pytest.raises(DataError):
        read_inputs(str(badtask), ["topic"])
    with pytest.raises(TrainError, match="several tasks"):
        Predictor(out, ["topic", "sentiment"], backend="torch").predict(["x"])


def test_output_is_written_atomically(run_dir, tmp_path, monkeypatch):
    import afkern._io as io_mod

    dst = tmp_path / "pred.jsonl"
    dst.write_text("earlier\n")

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(io_mod.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        T.predict(run_dir["out"], "topic", ["a text"], out=str(dst), backend="torch")
    assert dst.read_text() == "earlier\n" and os.listdir(tmp_path) == ["pred.jsonl"]


def test_concurrent_predictions_do_not_mix(run_dir):
    """One Predictor called from two threads at once (the route is per call): each thread gets what
    it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    rows = run_dir["rows"]
    pred = Predictor(run_dir["out"], TASKS, dtype=torch.float64, batch_size=3, backend="torch")
    jobs = [([r["text"] for r in rows], [r["task"] for r in rows]),
            ([r["text"] for r in rows[::-1]], ["routing"] * len(rows))]
    alone = [pred.predict(*j) for j in jobs]
    with ThreadPoolExecutor(2) as ex:
        for _ in range(3):
            got = list(ex.map(lambda j: pred.predict(*j), jobs))
            assert got == alone


def test_text_pairs_are_read_and_encoded_as_in_training(run_dir, tmp_path):
    rows = run_dir["rows"][:6]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps({"text": r["text"], "text_pair": r["text"][::-1], "task": r["task"]}) + "\n"
                           for r in rows))
    inp = read_inputs(str(src), TASKS)
    assert inp["pairs"] == [r["text"][::-1] for r in rows] and inp["where"][2] == f"{src} line 3"
    got = T.predict(run_dir["out"], TASKS, str(src), dtype=torch.float64, backend="torch")
    without = T.predict(run_dir["out"], TASKS, str(src), pair_column=None,
                        dtype=torch.float64, backend="torch")
    assert [g["probabilities"] for g in got] != [w["probabilities"] for w in without]
    for spec in set(r["task"] for r in rows):
        idx = [i for i, r in enumerate(rows) if r["task"] == spec]
        ref = _alone(run_dir, spec, [rows[i]["text"] for i in idx], torch.float64, [rows[i]["text"][::-1] for i in idx])
        for i, p in zip(idx, ref):
            assert got[i]["probability"] == pytest.approx(float(p.max()), abs=1e-9)


def test_a_batch_of_both_kinds_is_one_forward_and_equals_each_task_alone(run_dir):
    """Fusion targets and stage-1 tasks in one batch: ONE encoder forward (route(setup=...)), the
    same predictions as each task predicted on its own."""
    rows = run_dir["rows"]
    kinds = {find_task(run_dir["out"], r["task"]).kind for r in rows}
    assert kinds == {"fusion", "adapter"}
    pred = Predictor(run_dir["out"], TASKS, dtype=torch.float64, batch_size=len(rows), backend="torch")
    calls = []
    handle = pred.encoder.register_forward_hook(lambda m, a, o: calls.append(o.last_hidden_state.shape[0]))
    try:
        got = pred.predict([r["text"] for r in rows], [r["task"] for r in rows])
    finally:
        handle.remove()
    assert calls == [len(rows)]
    for spec in TASKS:
        idx = [i for i, r in enumerate(rows) if r["task"] == spec]
        one = pred.predict([rows[i]["text"] for i in idx], spec)
        for i, p in zip(idx, one):
            assert got[i]["label"] == p["label"]
            assert [got[i]["probabilities"][n] for n in pred.label_names(spec)] == pytest.approx(
                [p["probabilities"][n] for n in pred.label_names(spec)], abs=1e-9)
