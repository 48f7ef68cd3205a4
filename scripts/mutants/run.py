"""Mutation check of the test suite: plant one deliberate bug at a time in a scratch copy of the
repository, run the tests named for it, and report every mutant that no test kills.

    python scripts/mutants/run.py [--list FILE] [--only ID[,ID...]] [--scratch DIR] [--no-baseline]

(``bash scripts/mutants.sh`` runs it with the project's venv.) The list (default
``scripts/mutants/mutants.txt``) is a data file; its header says the format. For each mutant:

1. the scratch tree (``--scratch``, default ``/tmp/afkern-mutants``) is copied afresh from the
   working tree once per run (no ``.git``, no venvs, no build outputs), with ``afkern/kernels`` linked to
   ``kernels/`` (the editable install maps ``afkern.kernels`` to the real checkout, so the copy
   needs its own link), and every run imports the copy (``PYTHONPATH``; no bytecode written);
2. the ``find`` text, which must occur exactly once in the file, is replaced;
3. ``pytest -x`` runs the mutant's ``tests`` there; any failure or error kills it;
4. the file is restored.

Before the mutants, each distinct test selection runs once on the unmutated copy (``--no-baseline``
skips this): a selection that fails there cannot judge a mutant, and the run stops.

Every run sets ``AFKERN_JIT_BUILD=1``: the copy holds no built extension, so the CPU extension
(``csrc/cpu/``, which mutants may change) is compiled from the copy's sources at first use, in
``scratch/ext-cpu/<hash of the sources>`` (a mutant's sources build once more: about a minute).

Mutants marked ``needs: gpu`` (``csrc/`` CUDA sources) are killed only by tests of the CUDA kernels: without a
CUDA device they are reported NEEDS-GPU and not run; with one, the tests run with
``AFKERN_TEST_GPU=1 AFKERN_EXPECT_EXTENSION=1 AFKERN_JIT_BUILD=1`` and a fresh
``TORCH_EXTENSIONS_DIR``, so the mutated ``csrc/`` is compiled (a minute or two per mutant).

Exit status: 0 when every mutant that ran was killed and every entry is valid; 1 when a mutant
survived or an entry is an ERROR (stale: its ``find`` anchor is no longer in its file exactly once,
e.g. after a restructure moved the line; it is never counted as killed and must be re-anchored);
2 on a failing baseline.
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIELDS = ("id", "file", "find", "replace", "tests", "needs", "why")
# left out of the scratch copy: at the top level (version control, venvs, build and run outputs) ...
TOP_EXCLUDES = (".git", ".venv*", "build", "dist", "*.egg-info", ".gpu", ".whl", ".triton", "out")
# ... and anywhere (caches; a built extension, which the copy must not load in place of its csrc/)
ALL_EXCLUDES = ("__pycache__", ".pytest_cache", "_C*.so", "_C*.pyd", "_cpu*.so", "_cpu*.pyd")


@dataclass
class Mutant:
    id: str
    file: str
    find: str
    replace: str
    tests: List[str]
    needs: str = ""
    why: str = ""
    line: int = 0
    result: str = ""
    detail: str = ""
    seconds: float = 0.0
    extra: Dict[str, str] = field(default_factory=dict)


def _unescape(text: str) -> str:
    """``\\n`` and ``\\t`` in find/replace texts; ``\\\\`` for a backslash."""
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            out.append({"n": "\n", "t": "\t", "\\": "\\"}.get(nxt, "\\" + nxt))
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def parse_list(path: str) -> List[Mutant]:
    """Blocks of ``key: value`` lines separated by blank lines; ``#`` lines are comments."""
    mutants, block, start = [], {}, 0
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines() + [""]
    for no, raw in enumerate(lines, 1):
        if raw.lstrip().startswith("#"):
            continue
        if not raw.strip():
            if block:
                mutants.append(_make(block, path, start))
                block = {}
            continue
        m = re.match(r"^([a-z]+):\s?(.*)$", raw)
        if not m or m.group(1) not in FIELDS:
            raise SystemExit(f"{path}:{no}: expected 'field: value' with a field in {FIELDS}, got {raw!r}")
        if not block:
            start = no
        if m.group(1) in block:
            raise SystemExit(f"{path}:{no}: field {m.group(1)!r} given twice")
        block[m.group(1)] = m.group(2)
    ids = [m.id for m in mutants]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise SystemExit(f"{path}: duplicate mutant ids {dup}")
    return mutants


def _make(block: Dict[str, str], path: str, line: int) -> Mutant:
    missing = [k for k in ("id", "file", "find", "replace", "tests") if k not in block]
    if missing:
        raise SystemExit(f"{path}:{line}: mutant block lacks {missing}")
    needs = block.get("needs", "").strip()
    if needs not in ("", "gpu"):
        raise SystemExit(f"{path}:{line}: needs must be 'gpu' or absent, got {needs!r}")
    return Mutant(id=block["id"].strip(), file=block["file"].strip(), find=_unescape(block["find"]),
                  replace=_unescape(block["replace"]), tests=shlex.split(block["tests"]), needs=needs,
                  why=block.get("why", "").strip(), line=line)


def _ignore(directory: str, names: List[str]) -> List[str]:
    pats = ALL_EXCLUDES + (TOP_EXCLUDES if os.path.abspath(directory) == ROOT else ())
    return [n for n in names if any(fnmatch.fnmatch(n, p) for p in pats)]


def sync_scratch(scratch: str) -> str:
    """A fresh copy of the working tree in ``scratch/tree`` with ``afkern/kernels -> ../kernels``."""
    tree = os.path.join(scratch, "tree")
    if os.path.realpath(tree) == os.path.realpath(ROOT) or os.path.realpath(ROOT).startswith(os.path.realpath(tree) + os.sep):
        raise SystemExit(f"the scratch tree {tree} must lie outside the repository")
    shutil.rmtree(tree, ignore_errors=True)
    shutil.copytree(ROOT, tree, symlinks=True, ignore=_ignore)
    link = os.path.join(tree, "afkern", "kernels")
    if not os.path.lexists(link):
        os.symlink(os.path.join("..", "kernels"), link)
    return tree


def has_gpu(python: str) -> bool:
    r = subprocess.run([python, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True, text=True)
    return r.stdout.strip() == "True"


def _cpu_sources_hash(tree: str) -> str:
    h = hashlib.sha1()
    for path in sorted(glob.glob(os.path.join(tree, "csrc", "cpu", "*"))):
        with open(path, "rb") as f:
            h.update(os.path.basename(path).encode() + b"\0" + f.read())
    return h.hexdigest()[:16]


def run_tests(python: str, tree: str, tests: List[str], gpu: bool, timeout: int, ext_dir: Optional[str] = None):
    # the CPU extension (csrc/cpu/) is compiled from the copy's sources at first use, in a folder
    # named by their hash: ninja judges staleness by mtimes, and the copy keeps the originals' (a
    # restored source would look older than the mutant's build)
    env = dict(os.environ, PYTHONPATH=tree, PYTHONDONTWRITEBYTECODE="1", AFKERN_JIT_BUILD="1",
               TORCH_EXTENSIONS_DIR=os.path.join(os.path.dirname(tree), "ext-cpu", _cpu_sources_hash(tree)))
    if gpu:
        env.pop("TRITON_INTERPRET", None)
        env.update(AFKERN_TEST_GPU="1", AFKERN_EXPECT_EXTENSION="1", AFKERN_JIT_BUILD="1")
        if ext_dir:
            env["TORCH_EXTENSIONS_DIR"] = ext_dir
    cmd = [python, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", "-W", "ignore"] + tests
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout or ""
        rc, out = -1, partial.decode(errors="replace") if isinstance(partial, bytes) else partial
    return rc, out, time.time() - t0


def first_failure(out: str) -> str:
    """The first failing test's node id and its first assertion line."""
    why = next((ln[1:].strip() for ln in out.splitlines() if ln.startswith("E ")), "")
    why = f"  [{why[:140]}]" if why else ""
    for line in out.splitlines():
        m = re.match(r"^(FAILED|ERROR) (\S+)", line)
        if m:
            return m.group(2) + why
    tail = [ln for ln in out.strip().splitlines() if ln.strip()]
    return tail[-1][:160] if tail else "(no output)"


def summary_line(out: str) -> str:
    for line in reversed(out.strip().splitlines()):
        if re.search(r"\b(passed|failed|error|no tests ran)\b", line):
            return line.strip("= ").strip()
    return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", default=os.path.join(ROOT, "scripts", "mutants", "mutants.txt"))
    ap.add_argument("--only", default="", help="comma-separated mutant ids (default: all)")
    ap.add_argument("--scratch", default=os.environ.get("AFKERN_MUTANTS_DIR", "/tmp/afkern-mutants"))
    ap.add_argument("--python", default=sys.executable, help="interpreter with pytest, torch, ... (default: this one)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of each test selection")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per pytest run")
    args = ap.parse_args(argv)
    args.python = os.path.abspath(args.python)  # the tests run from the scratch tree (not realpath: a venv)

    mutants = parse_list(args.list)
    if args.only:
        want = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [w for w in want if w not in {m.id for m in mutants}]
        if unknown:
            raise SystemExit(f"unknown mutant ids {unknown}")
        mutants = [m for m in mutants if m.id in want]
    gpu = has_gpu(args.python)
    print(f"mutants: {len(mutants)} from {os.path.relpath(args.list, ROOT)}; CUDA device: {'yes' if gpu else 'no'}")

    # validate every entry against the real tree first: a stale entry is reported, not silently skipped
    for m in mutants:
        src = os.path.join(ROOT, m.file)
        if not os.path.exists(src):
            m.result, m.detail = "ERROR", f"stale entry: {m.file} does not exist"
            continue
        n = open(src, encoding="utf-8").read().count(m.find)
        if n != 1:
            m.result, m.detail = "ERROR", f"stale anchor: the find text occurs {n} times in {m.file} (must be once); re-anchor it"
        elif m.needs == "gpu" and not gpu:
            m.result, m.detail = "NEEDS-GPU", "not run: only the CUDA kernels' tests on a device can kill it"

    runnable = [m for m in mutants if not m.result]
    tree = sync_scratch(args.scratch) if runnable else ""
    if runnable and not args.no_baseline:
        seen = set()
        for m in runnable:
            key = (tuple(m.tests), m.needs == "gpu")
            if key in seen:
                continue
            seen.add(key)
            ext = os.path.join(args.scratch, "ext-baseline") if m.needs == "gpu" else None
            rc, out, dt = run_tests(args.python, tree, m.tests, m.needs == "gpu", args.timeout, ext)
            print(f"baseline  {' '.join(m.tests)}: {summary_line(out)} ({dt:.0f} s)")
            if rc != 0:
                print(out[-4000:])
                print(f"BASELINE FAILS for {' '.join(m.tests)} (first: {first_failure(out)}): fix the tree "
                      "or the list before judging mutants")
                return 2

    for i, m in enumerate(runnable, 1):
        path = os.path.join(tree, m.file)
        original = open(path, encoding="utf-8").read()
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(original.replace(m.find, m.replace, 1))
            ext = os.path.join(args.scratch, f"ext-{m.id}") if m.needs == "gpu" else None
            if ext:
                shutil.rmtree(ext, ignore_errors=True)
            rc, out, m.seconds = run_tests(args.python, tree, m.tests, m.needs == "gpu", args.timeout, ext)
        finally:
            with open(path, "w", encoding="utf-8") as f:
                f.write(original)
        if rc in (1, 2, 3):  # tests failed / interrupted (a collection error) / internal error
            m.result, m.detail = "KILLED", first_failure(out)
        elif rc == 0:
            m.result, m.detail = "SURVIVED", summary_line(out)
        elif rc == 5:
            m.result, m.detail = "ERROR", "its tests selection collected no tests"
        elif rc == -1:
            m.result, m.detail = "TIMEOUT", f"over {args.timeout} s"
        else:
            m.result, m.detail = "KILLED", f"pytest exit {rc}: {first_failure(out)}"
        print(f"[{i}/{len(runnable)}] {m.id}: {m.result} ({m.seconds:.0f} s) {m.detail}", flush=True)

    w = max([len(m.id) for m in mutants] + [6])
    print("\n%-*s %-9s %s" % (w, "mutant", "result", "killed by / why not"))
    for m in mutants:
        print("%-*s %-9s %s" % (w, m.id, m.result, m.detail))
    bad = [m for m in mutants if m.result in ("SURVIVED", "ERROR", "TIMEOUT")]
    for m in bad:
        print(f"\n{m.result}: {m.id} ({m.file}, list line {m.line}): {m.why}")
    counts = {r: sum(m.result == r for m in mutants) for r in ("KILLED", "SURVIVED", "NEEDS-GPU", "ERROR", "TIMEOUT")}
    print("\n" + ", ".join(f"{v} {k.lower()}" for k, v in counts.items() if v))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
