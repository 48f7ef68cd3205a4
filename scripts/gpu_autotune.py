#!/usr/bin/env python3
"""Measure which Triton config of the fused core's two GEMM kernels (scores, mix) wins on this
GPU, at BERT-base and BERT-large widths, and record the winners where the kernels read them
(kernels/tuned.py: kernels/tuned_configs.json). Stage ``autotune`` of scripts/gpu_validate.sh.

For each width (base: d 768, intermediate 3072, r 48; large: 1024, 4096, 64), dtype (bfloat16,
float16, float32) and form (``infer``: a no-grad forward, the folded path, kernels with STORE_G /
no APPLY_ACT; ``train``: a forward with gradients, the unfolded path), a ``FusedAdapterBlock``
with the triton backend runs T = 4096 tokens (random weights and inputs). Each candidate of
``scores_configs`` / ``mix_configs`` is forced through the same file the kernels read (a
temporary one, AFKERN_TUNED_CONFIGS) and the block's call is timed (CUDA: triton's do_bench,
median; CPU dry run: a host clock): first every scores candidate at N = 16 with the first mix
candidate (the scores kernel's autotune key has no N), then every mix candidate at each N with
the winning scores config. The whole call is timed, not the kernel alone: the other work of the
call is the same for every candidate, and what counts is the block's time.

Writes ``<out-root>/<slug>/autotune.json`` (every timing) and merges the winners into
``--tuned-file`` (default kernels/tuned_configs.json); then reruns one shape with that file in
force and checks that the autotuners took the recorded configs (the keys written are the keys the
kernels look up). Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("AFKERN_TUNED_CONFIGS", "off")  # measure every candidate; forced one by one below

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_tools import device_slug, table  # noqa: E402

WIDTHS = {"base": (768, 3072), "large": (1024, 4096)}  # d, intermediate; r = d / 16 (Pfeiffer)
FORMS = {"infer": dict(store_g=1, apply_act=0), "train": dict(store_g=0, apply_act=1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-root", default="benchmarks/results/gpu-autotune")
    p.add_argument("--tuned-file", default="kernels/tuned_configs.json")
    p.add_argument("--widths", default="base,large")
    p.add_argument("--dtypes", default="bfloat16,float16,float32")
    p.add_argument("--n-adapters", default="16,1,2,4,8,32,64", help="N values of the mix kernel (the first also tunes scores)")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--rep-ms", type=float, default=50.0, help="do_bench time per candidate")
    p.add_argument("--budget-s", type=float, default=270.0, help="no new (width, dtype) group starts after this")
    p.add_argument("--dry", action="store_true", help="CPU, Triton interpreter, tiny shapes (the stage's dry run)")
    a = p.parse_args(argv)
    t_start = time.perf_counter()
    if a.dry:
        os.environ["TRITON_INTERPRET"] = "1"
        WIDTHS.clear()
        WIDTHS.update(base=(32, 48), large=(48, 64))
        a.n_adapters, a.tokens, a.dtypes = "2,3", 32, "bfloat16"

    import triton

    import afkern
    from afkern._io import atomic_write_json
    from afkern.kernels import fusion_core as fc, tuned
    from afkern.kernels.common import arch as device_arch

    device = torch.device("cpu" if a.dry else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_autotune: no CUDA device (use --dry on a CPU)")
        return 2
    if a.dry:  # the interpreter's lists hold one config; two make the choice (and its plumbing) real
        fc.scores_configs = lambda arch, fp32=False, seg=False: [fc._cfg(16, 64, 4, 1), fc._cfg(16, 32, 4, 1)]
        fc.mix_configs = lambda arch, fp32=False, seg=False: [fc._cfg(16, 64, 4, 1, BLOCK_D=64), fc._cfg(16, 32, 4, 1, BLOCK_D=32)]
    arch = device_arch(device)
    slug = device_slug(str(device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    tmpdir = tempfile.mkdtemp(prefix="afkern-tune-")
    counter = [0]

    def force(entries: dict) -> None:
        """Put ``entries`` in force for the next launches (a fresh file, fresh autotuners)."""
        counter[0] += 1
        path = os.path.join(tmpdir, f"t{counter[0]}.json")
        with open(path, "w") as f:
            json.dump({"entries": entries}, f)
        os.environ[tuned.ENV] = path
        fc._TUNED.clear()

    def bench(fn) -> float:
        fn()  # compile + warm
        if device.type == "cuda":
            torch.cuda.synchronize()
            return float(triton.testing.do_bench(fn, warmup=max(5, a.rep_ms / 4), rep=a.rep_ms, return_mode="median"))
        ts = []
        for _ in range(1 if a.dry else 3):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return sorted(ts)[len(ts) // 2]

    def keys(d, r, n, form, dtype):
        f = FORMS[form]
        ks = tuned.entry_key("scores", arch, dtype, [("D", d), ("R", r), ("BLOCK_R", fc.block_r(r)), ("STORE_G", f["store_g"])])
        km = tuned.entry_key("mix", arch, dtype, [("D", d), ("R", r), ("NADP", n), ("APPLY_ACT", f["apply_act"])])
        return ks, km

    def make_call(d, inter, n, dtype, form):
        torch.manual_seed(n)
        blk = afkern.FusedAdapterBlock(d, [f"a{i}" for i in range(n)], in_features=inter, device=device, dtype=dtype)
        with torch.no_grad():
            for prm in blk.parameters():
                prm.add_(torch.randn_like(prm) * 0.05)
        blk.set_backend("triton").eval()
        h = torch.randn(a.tokens, inter, device=device, dtype=dtype)
        x = torch.randn(a.tokens, d, device=device, dtype=dtype)
        if form == "infer":
            def call():
                with torch.no_grad():
                    return blk(h, x)
        else:
            def call():
                with torch.enable_grad():
                    return blk(h, x)
        return blk, call

    results, winners, rows = [], {}, []
    ns = [int(v) for v in a.n_adapters.split(",")]
    stopped = None
    # dtype-major: every width in bfloat16 first, so a budget that runs out leaves the other dtypes untuned
    groups = [(w, t) for t in a.dtypes.split(",") if t for w in a.widths.split(",") if w]
    for wname, dname in groups:
        d, inter = WIDTHS[wname]
        if time.perf_counter() - t_start > a.budget_s:
            stopped = f"budget of {a.budget_s:.0f}s reached before {wname} {dname}"
            break
        dtype = getattr(torch, dname)
        fp32 = dtype == torch.float32
        sc, mc = fc.scores_configs(arch, fp32), fc.mix_configs(arch, fp32)
        for form in FORMS:
            best_s = sc[0]
            for n in ns:
                blk, call = make_call(d, inter, n, dtype, form)
                ks, km = keys(d, blk.bottleneck, n, form, dname)
                if n == ns[0] and len(sc) > 1:
                    times = []
                    for c in sc:
                        force({ks: {"config": tuned.config_dict(c)}, km: {"config": tuned.config_dict(mc[0])}})
                        times.append(bench(call))
                    k = min(range(len(sc)), key=times.__getitem__)
                    best_s = sc[k]
                    results.append(dict(kernel="scores", key=ks, width=wname, dtype=dname, form=form, n=n,
                                        tokens=a.tokens, candidates=[tuned.config_dict(c) for c in sc], ms=times))
                    winners[ks] = dict(config=tuned.config_dict(best_s), ms=times[k], first_candidate_ms=times[0],
                                       measured=dict(width=wname, n=n, tokens=a.tokens, form=form))
                    rows.append([wname, dname, "scores", form, str(n), _cfg_str(best_s), f"{times[k]:.4f}",
                                 f"{times[0]:.4f}", f"{max(times) / min(times):.2f}x", str(len(sc))])
                if len(mc) > 1:
                    times = []
                    for c in mc:
                        force({ks: {"config": tuned.config_dict(best_s)}, km: {"config": tuned.config_dict(c)}})
                        times.append(bench(call))
                    k = min(range(len(mc)), key=times.__getitem__)
                    results.append(dict(kernel="mix", key=km, width=wname, dtype=dname, form=form, n=n,
                                        tokens=a.tokens, candidates=[tuned.config_dict(c) for c in mc], ms=times))
                    winners[km] = dict(config=tuned.config_dict(mc[k]), ms=times[k], first_candidate_ms=times[0],
                                       measured=dict(width=wname, n=n, tokens=a.tokens, form=form))
                    if n == 16 or n == ns[0]:
                        rows.append([wname, dname, "mix", form, str(n), _cfg_str(mc[k]), f"{times[k]:.4f}",
                                     f"{times[0]:.4f}", f"{max(times) / min(times):.2f}x", str(len(mc))])
                del blk, call

    meta = dict(device=name, slug=slug, arch=arch, triton=triton.__version__, torch=torch.__version__,
                date=time.strftime("%Y-%m-%dT%H:%M:%S%z"), dry=a.dry)
    folder = os.path.join(a.out_root, slug)
    os.makedirs(folder, exist_ok=True)
    atomic_write_json(os.path.join(folder, "autotune.json"),
                      dict(meta, method=__doc__.split("\n\n")[1], stopped=stopped, results=results), indent=1)

    # merge the winners into the file the kernels read
    try:
        with open(a.tuned_file) as f:
            data = json.load(f)
        entries = data.get("entries", {}) if isinstance(data, dict) else {}
    except (OSError, ValueError):
        entries = {}
    for k, v in winners.items():
        entries[k] = dict(v, device=name, triton=meta["triton"], torch=meta["torch"], date=meta["date"])
    doc = {"about": "Triton configs measured on GPUs by scripts/gpu_autotune.py; read by kernels/tuned.py "
                    "(key: kernel|sm<arch>|dtype|autotune key). Regenerate with scripts/gpu_validate.sh autotune.",
           "entries": dict(sorted(entries.items()))}
    atomic_write_json(a.tuned_file, doc, indent=1)

    check = _check_reading_side(a, fc, tuned, winners, make_call, keys, ns) if winners else "nothing to check"
    print(f"autotune on {name} (sm_{arch}), T={a.tokens}: {len(winners)} winners -> {a.tuned_file} "
          f"({len(entries)} entries in all); timings -> {os.path.join(folder, 'autotune.json')}")
    if stopped:
        print(f"STOPPED EARLY: {stopped}")
    print(f"reading side: {check}")
    print(table(["width", "dtype", "kernel", "form", "N", "winner (BT,BK[,BD]/warps/stages)", "block ms",
                 "first cand. ms", "max/min", "cands"], rows))
    return 0 if not str(check).startswith("FAILED") else 1


def _cfg_str(c) -> str:
    kw = c.kwargs
    tiles = ",".join(str(kw[k]) for k in ("BLOCK_T", "BLOCK_K", "BLOCK_D") if k in kw)
    return f"{tiles}/w{c.num_warps}/s{c.num_stages}"


def _check_reading_side(a, fc, tuned, winners, make_call, keys, ns) -> str:
    """Rerun the first measured shape with the written file in force: the autotuners' choices must
    be the recorded configs."""
    os.environ[tuned.ENV] = os.path.abspath(a.tuned_file)
    fc._TUNED.clear()
    first = next(iter(winners.values()))["measured"]
    wname = first["width"]
    d, inter = WIDTHS[wname]
    dname = next(k.split("|")[2] for k in winners)
    dtype = getattr(torch, dname)
    hits, misses = 0, []
    for form in FORMS:
        n = ns[0]
        blk, call = make_call(d, inter, n, dtype, form)
        call()
        ks, km = keys(d, blk.bottleneck, n, form, dname)
        for which, key in (("scores", ks), ("mix", km)):
            at = fc._TUNED.get((which, fc.device_arch(blk.down_weight.device), dtype == torch.float32))
            if key not in winners or at is None:
                continue
            chosen = [tuned.config_dict(c) for c in getattr(at, "cache", {}).values()]
            if winners[key]["config"] in chosen or (len(at.configs) == 1 and tuned.config_dict(at.configs[0]) == winners[key]["config"]):
                hits += 1
            else:
                misses.append(f"{key}: autotuner chose {chosen}, file has {winners[key]['config']}")
    if misses:
        return "FAILED: " + "; ".join(misses)
    return f"ok ({hits} keys of {wname} {dname} N={ns[0]} taken from the file)"


if __name__ == "__main__":
    sys.exit(main())
