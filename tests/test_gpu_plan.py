"""The GPU plan (scripts/gpu_validate.sh, docs/GPU_RUNBOOK.md) is consistent, so that no typo wastes
lent GPU minutes: the two calls' stages exist and fit their deadlines, each call's command fits the
device tool's 2,000 characters, the test list names existing test files, the scripts parse, and the
new decode-step script runs its plumbing on the CPU. The whole dry run of both calls
(``AFKERN_GPU_DRY=1 bash scripts/gpu_validate.sh call1`` / ``call2``) takes 1.5 + 1 minutes here,
too long for the suite; the runbook records its timings."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_validate.sh")
RUNBOOK = os.path.join(ROOT, "docs", "GPU_RUNBOOK.md")
TOOL_COMMAND_LIMIT = 2000  # characters of one device-tool command
RESERVE_S = 25  # the script's packing reserve (AFKERN_GPU_RESERVE_S)


def _plan() -> dict:
    out = subprocess.run(["bash", SCRIPT, "plan"], capture_output=True, text=True, check=True, timeout=30).stdout
    plan = {"caps": {}, "deadline": {}}
    for line in out.splitlines():
        k, *v = line.split()
        if k in ("call1:", "call2:"):
            plan[k[:-1]] = v
        elif k == "cap":
            plan["caps"][v[0]] = int(v[1])
        elif k == "deadline":
            plan["deadline"][v[0]] = int(v[1])
    return plan


def _runbook_calls() -> dict:
    """{call: (command, timeout_s)} from the runbook's table of device-tool calls."""
    calls = {}
    for line in open(RUNBOOK):
        m = re.match(r"\|\s*(call[12])\s*\|\s*`([^`]+)`\s*\|\s*(\d+)\s*\|", line)
        if m:
            calls[m.group(1)] = (m.group(2), int(m.group(3)))
    return calls


def test_two_calls_cover_the_issue_and_fit_their_deadlines():
    plan = _plan()
    assert plan["call1"] == ["build", "tests", "ceilings", "quick"]
    assert plan["call2"] == ["autotune", "graphs"]
    text = open(SCRIPT).read()
    for stage in plan["call1"] + plan["call2"]:
        assert re.search(rf"^st_{stage}\(\) {{", text, flags=re.M), stage
    # call 1: the capped stages leave the quick benchmark at least a minute before the packing reserve
    fixed = sum(plan["caps"][s] for s in ("build", "tests", "ceilings"))
    assert fixed + 60 + RESERVE_S <= plan["deadline"]["call1"]
    assert plan["caps"]["autotune"] + 60 + RESERVE_S <= plan["deadline"]["call2"]
    calls = _runbook_calls()
    assert set(calls) == {"call1", "call2"}
    for name, (cmd, timeout_s) in calls.items():
        assert len(cmd) <= TOOL_COMMAND_LIMIT and cmd.endswith(f"gpu_validate.sh {name}")
        assert plan["deadline"][name] + 25 <= timeout_s <= 600, (name, timeout_s)
    # the issue's budgets: call 1 at most 8 minutes (timeout_s about 500), call 2 at most 6; the
    # deadline is when the last stage stops, the packing after it takes seconds
    assert plan["deadline"]["call1"] <= 8 * 60 - 10 and calls["call1"][1] <= 510
    assert plan["deadline"]["call2"] <= 6 * 60 - 30 and calls["call2"][1] <= 6 * 60


def _entries():
    for raw in open(os.path.join(ROOT, "scripts", "gpu_tests.txt")):
        line = raw.split("#", 1)[0].strip()
        if line:
            words = shlex.split(line)
            while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
                words.pop(0)
            yield words[0]


def test_every_test_list_entry_names_an_existing_test_file():
    entries = list(_entries())
    assert len(entries) >= 5
    for target in entries:
        path, _, node = target.partition("::")
        full = os.path.join(ROOT, path)
        assert os.path.isfile(full), f"scripts/gpu_tests.txt names {path}, which does not exist"
        src = open(full).read()
        assert re.search(r"^def test_", src, flags=re.M), path
        if node:
            assert re.search(rf"^def {re.escape(node.split('[')[0])}\(", src, flags=re.M), target
    # the kernels' own suites are all on the device list
    for must in ("tests/test_triton_fusion.py", "tests/test_cuda_ext.py", "tests/test_routing.py",
                 "tests/test_normfree_site.py", "tests/test_triton_routed_core.py", "scripts/gpu_test_widths.py"):
        assert must in entries


def test_gpu_scripts_parse():
    subprocess.run(["bash", "-n", SCRIPT], check=True, timeout=30)
    subprocess.run(["bash", "-n", os.path.join(ROOT, "scripts", "gpu_wheels.sh")], check=True, timeout=30)
    for name in ("gpu_tools", "gpu_autotune", "gpu_ceilings", "gpu_test_widths", "gpu_graphs"):
        compile(open(os.path.join(ROOT, "scripts", f"{name}.py")).read(), name, "exec")


def test_working_tree_leaves_room_for_the_carried_wheels():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    size = sum(os.path.getsize(os.path.join(ROOT, f.decode())) for f in files if f and os.path.isfile(os.path.join(ROOT, f.decode())))
    # 64 MiB travel in all: the tree, .whl (15.4 MiB) and .gpu (at most 38 MiB, packed so)
    assert size + (15.4 + 38) * 2**20 <= 64 * 2**20, f"the tracked tree is {size / 2**20:.1f} MiB"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_decode_graph_script_dry_run(tmp_path):
    """scripts/gpu_graphs.py --dry: every way (eager, graph, compile) of the plain and torch setups
    runs and agrees with the float32 truth (on a CPU the graph is replayed by calling the step)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_graphs.py"), "--dry", "--setups", "plain,torch",
                        "--out-root", str(tmp_path)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| plain") or ln.startswith("| torch")]
    assert len(rows) == 6 and all("| ok " in ln for ln in rows), r.stdout
    import json

    rec = json.load(open(next(os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if f == "graphs.json")))
    assert {(x["setup"], x["way"]) for x in rec["records"]} == {(s, w) for s in ("plain", "torch")
                                                                  for w in ("eager", "graph", "compile")}
