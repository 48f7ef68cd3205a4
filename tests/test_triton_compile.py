"""Compile every Triton kernel of afkern.kernels (kernels/) for sm_80 and sm_90 without a GPU.

``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32))``
runs the whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with Triton's bundled ptxas), so
it catches what the interpreter accepts but the GPU compiler rejects. For each kernel, at the
block sizes and autotune configs it launches, the test records registers, spill bytes, shared
memory and whether tensor-core instructions (mma.sync / wgmma) appear in the PTX, and asserts:
no compile failure, no spills, shared memory within the architecture's per-block limit, and
tensor-core use in the two GEMM kernels.

Launch-time specialisation is reproduced: an int argument equal to 1 becomes a constexpr, and
pointers and ints divisible by 16 carry ``tt.divisibility = 16`` (as ``JITFunction`` does for
16-byte-aligned tensors and strides), so the compiled code is what a real launch would build.

Works with triton 3.6 and 3.9 (same ASTSource/GPUTarget API; scripts/test_triton36.sh runs this
file under 3.6). ``python tests/test_triton_compile.py`` prints the resource table used in
docs/KERNELS_TRITON.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

triton = pytest.importorskip("triton")

# per-block shared-memory limits (bytes): A100 (sm_80) 163 KB, H100 (sm_90) 227 KB
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ARCHS = (80, 90)


def _kernels():
    """One namespace over the kernel modules (kernels/fusion_core.py, rowop.py, add_norm.py)."""
    import types

    from afkern.kernels import add_norm, fusion_core, rowop, segmented

    return types.SimpleNamespace(**{k: v for m in (add_norm, rowop, fusion_core, segmented) for k, v in vars(m).items()})


def _raw(kernel):
    """The JITFunction under an autotuner (or the JITFunction itself)."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def compile_kernel(kernel, args: dict, arch: int, num_warps: int, num_stages: int):
    """Compile ``kernel`` with ``args`` (name -> type string such as "*bf16"/"i32"/"fp32" paired
    with a sample value as (type, value), or a constexpr value). Returns a resource dict."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _raw(kernel)
    cexpr = {fn.arg_names[i] for i in fn.constexprs}
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        v = args[name]
        if name in cexpr:
            sig[name] = "constexpr"
            consts[name] = v
            continue
        ty, sample = v
        if ty.startswith("i") and sample == 1:  # JITFunction specialises ints equal to 1
            sig[name] = "constexpr"
            consts[name] = 1
            continue
        sig[name] = ty
        if ty.startswith("*") or (ty.startswith("i") and sample % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = k.asm.get("ptx", "")
    regs, spills = _resource_usage(k.asm["cubin"])
    return dict(
        kernel=fn.__name__, arch=arch, num_warps=num_warps, num_stages=num_stages, n_regs=regs,
        n_spills=spills, shared=k.metadata.shared, mma="mma.sync" in ptx, wgmma="wgmma." in ptx,
    )


def _resource_usage(cubin: bytes):
    """(registers, spill bytes) from Triton's bundled cuobjdump; STACK counts local-memory spills."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next(l for l in out.splitlines() if "REG:" in l)
    fields = dict(tok.split(":", 1) for tok in line.split() if ":" in tok)
    return int(fields["REG"]), int(fields["STACK"]) + int(fields.get("LOCAL", 0))


# ----------------------------------------------------------------------------------------------
# the launches (BERT-base width d = 768, r = 48, N = 16, T = 4096 unless said otherwise)
# ----------------------------------------------------------------------------------------------


def _p(dt):
    return ("*" + dt, 0)


def _i(v):
    return ("i32", v)


def launches(arch: int):
    """(label, kernel, args, num_warps, num_stages, is_gemm) for every kernel at the configs it
    launches on sm_<arch> (every autotune candidate: the autotuner runs them all)."""
    K = _kernels()
    T, d, r, N = 4096, 768, 48, 16
    NR = N * r
    out = []
    # training (unfolded, A stored) and, for the routed inference form, per-segment folded maps
    # (HAS_SEG: the tile loops over the segments it overlaps)
    for dt, ieee in (("bf16", False), ("fp32", True)):
        for seg in (False, True):
            for cfg in K.scores_configs(arch, fp32=ieee, seg=seg):
                args = dict(
                    X=_p(dt), Q=_p(dt), WD=_p(dt), BD=_p(dt), WA=_p(dt), BA=_p(dt), WS=_p(dt), BS=_p(dt), SC=_p(dt),
                    S=_p("fp32"), ZG=_p(dt), A=_p(dt), SEG=_p("i32"), WOFF=_p("i64"), BOFF=_p("i64"), T=_i(T), D=_i(d),
                    R=_i(r), stride_x=_i(d), stride_q=_i(d), s_wd_k=_i(1), s_wd_c=_i(d), s_wa_k=_i(1), s_wa_c=_i(d),
                    s_ws_k=_i(1), s_ws_n=_i(d), stride_s=_i(N), stride_zg=_i(NR), stride_a=_i(NR), ACT=2,
                    HAS_BA=seg, HAS_BS=seg, HAS_SC=not seg, STORE_A=not seg, STORE_G=seg, HAS_SEG=seg, IEEE=ieee,
                    BLOCK_R=K.block_r(r), **cfg.kwargs,
                )
                out.append((f"scores {dt}{' seg' if seg else ''} {cfg.kwargs}", K._fusion_scores_kernel_impl, args,
                            cfg.num_warps, cfg.num_stages, True))
    for dt, ieee in (("bf16", False), ("fp32", True)):
        for seg in (False, True):
            for cfg in K.mix_configs(arch, fp32=ieee, seg=seg):
                args = dict(
                    ZG=_p(dt), P=_p("fp32"), WU=_p(dt), BU=_p(dt), RES=_p(dt), OUT=_p(dt), SEG=_p("i32"),
                    WOFF=_p("i64"), T=_i(T), D=_i(d), R=_i(r), NADP=_i(N), stride_zg=_i(NR), stride_p=_i(N),
                    s_wu_c=_i(d), s_wu_k=_i(1), s_bu_n=_i(d), s_bu_k=_i(1), stride_res=_i(d), stride_out=_i(d), ACT=2,
                    APPLY_ACT=not seg, HAS_RES=True, HAS_SEG=seg, IEEE=ieee,
                    BLOCK_N=max(16, triton.next_power_of_2(N)), **cfg.kwargs,
                )
                out.append((f"mix {dt}{' seg' if seg else ''} {cfg.kwargs}", K._fusion_mix_kernel_impl, args,
                            cfg.num_warps, cfg.num_stages, True))
    BN = triton.next_power_of_2(N)
    out.append(("softmax", K._fusion_softmax_kernel, dict(
        S=_p("fp32"), M=_p("fp32"), B=_p("fp32"), P=_p("fp32"), T=_i(T), NADP=_i(N), stride_s=_i(N), stride_m=_i(N),
        stride_b=_i(0), stride_p=_i(N), inv_temperature=("fp32", 0.5), HAS_M=True, HAS_B=True,
        BLOCK_T=max(1, min(128, 4096 // BN)), BLOCK_N=BN), 4, 1, False))
    for rr, nn in ((48, 16), (384, 2)):
        BT, BR, BNr, nw = K.rowop_blocks(rr, nn)
        common = dict(T=_i(T), R=_i(rr), NADP=_i(nn), inv_temperature=("fp32", 1.0), ACT=3, HAS_M=True,
                      BLOCK_T=BT, BLOCK_R=BR, BLOCK_N=BNr)
        w = nn * rr
        out.append((f"rowop_fwd r={rr} N={nn}", K._rowop_fwd_kernel, dict(
            Z=_p("bf16"), A=_p("bf16"), SB=_p("bf16"), M=_p("fp32"), B=_p("fp32"), Y=_p("bf16"), P=_p("fp32"),
            stride_z=_i(w), stride_a=_i(w), stride_sb=_i(nn), stride_m=_i(nn), stride_b=_i(0), stride_y=_i(w),
            stride_p=_i(nn), HAS_SB=True, HAS_B=True, **common),
            nw, 1, False))
        out.append((f"rowop_bwd r={rr} N={nn}", K._rowop_bwd_kernel, dict(
            DY=_p("bf16"), DP=_p("fp32"), Z=_p("bf16"), A=_p("bf16"), P=_p("fp32"), M=_p("fp32"), DZ=_p("bf16"),
            DA=_p("bf16"), DS=_p("fp32"), Y=_p("bf16"), stride_dy=_i(w), stride_dp=_i(nn), stride_z=_i(w),
            stride_a=_i(w), stride_p=_i(nn), stride_m=_i(nn), stride_dz=_i(w), stride_da=_i(w), stride_ds=_i(nn),
            stride_y=_i(w), HAS_DP=True, STORE_Y=True, **common), nw, 1, False))
    # the routed layer's segmented GEMMs (kernels/segmented.py): the folded [A | sb] map
    # (K = d, N = N r + N) forward, its data gradient, and the weight gradient of a d x d map
    import torch

    for dt, tdt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        BT, BNs, BKs, nw, ns = K.seg_tiles(tdt)
        out.append((f"seg_mm {dt}", K._seg_mm_kernel, dict(
            X=_p(dt), W=_p(dt), B=_p(dt), BASE=_p(dt), OUT=_p(dt), TAB=_p("i32"), n_tiles=_i(T // BT + 8),
            KD=_i(d), ND=_i(NR + N), stride_x=_i(d), s_ws=_i(d * (NR + N)), s_wk=_i(NR + N), s_wn=_i(1),
            s_bs=_i(NR + N), stride_base=_i(NR + N), stride_out=_i(NR + N), HAS_B=True, HAS_BASE=True,
            IEEE=dt == "fp32", BLOCK_T=BT, BLOCK_N=BNs, BLOCK_K=BKs), nw, ns, True))
        BKw, BNw, BTw, nw, ns = K.wgrad_tiles(tdt)
        out.append((f"seg_wgrad {dt}", K._seg_wgrad_kernel, dict(
            X=_p(dt), DY=_p(dt), DW=_p("fp32"), SEGS=_p("i32"), S=_i(8), KD=_i(d), ND=_i(d), stride_x=_i(d),
            stride_dy=_i(d), s_dws=_i(d * d), s_dwk=_i(d), IEEE=dt == "fp32", BLOCK_K=BKw, BLOCK_N=BNw,
            BLOCK_T=BTw), nw, ns, True))
    for dd in (768, 1024):
        BD = triton.next_power_of_2(dd)
        nw = K._ln_warps(BD)
        out.append((f"add_ln_fwd d={dd}", K._add_ln_fwd_kernel, dict(
            X=_p("bf16"), RES=_p("bf16"), W=_p("bf16"), B=_p("bf16"), Y=_p("bf16"), MEAN=_p("fp32"), RSTD=_p("fp32"),
            stride_x=_i(dd), stride_res=_i(dd), stride_y=_i(dd), D=_i(dd), eps=("fp32", 1e-12), HAS_RES=True,
            HAS_W=True, HAS_B=True, BLOCK_D=BD), nw, 1, False))
        out.append((f"add_ln_bwd d={dd}", K._add_ln_bwd_kernel, dict(
            X=_p("bf16"), RES=_p("bf16"), W=_p("bf16"), DY=_p("bf16"), DX=_p("bf16"), DW_PART=_p("fp32"),
            DB_PART=_p("fp32"), MEAN=_p("fp32"), RSTD=_p("fp32"), stride_x=_i(dd), stride_res=_i(dd),
            stride_dy=_i(dd), stride_dx=_i(dd), T=_i(T), D=_i(dd), ROWS_PER_PROG=_i(8), HAS_RES=True, HAS_W=True,
            BLOCK_D=BD), nw, 1, False))
    return out


def check(label, rec, is_gemm):
    assert rec["n_spills"] == 0, f"{rec['kernel']} spills {rec['n_spills']} bytes on sm_{rec['arch']}: {rec}"
    assert rec["shared"] <= SMEM_LIMIT[rec["arch"]], f"shared memory over the sm_{rec['arch']} limit: {rec}"
    assert 0 < rec["n_regs"] <= 255, rec
    if is_gemm and "fp32" not in label:  # float32 operands use exact FMA products, not TF32 MMA
        assert rec["mma"] or rec["wgmma"], f"{rec['kernel']} uses no tensor-core instruction: {rec}"


def run_checks(arch: int):
    """Compile and check every launch for sm_<arch>; returns (records, failures)."""
    failures, recs = [], []
    todo = launches(arch)
    for label, kernel, args, nw, ns, is_gemm in todo:
        try:
            rec = compile_kernel(kernel, args, arch, nw, ns)
            recs.append((label, rec))
            check(label, rec, is_gemm)
        except Exception as exc:  # collect every failure, report all at once
            failures.append(f"{label} sm_{arch}: {type(exc).__name__}: {str(exc)[:300]}")
    if len(recs) != len(todo) or len(todo) < 15:
        failures.append(f"compiled {len(recs)} of {len(todo)} launches")
    return recs, failures


@pytest.fixture(scope="module")
def children():
    """Under TRITON_INTERPRET=1 (tests/conftest.py sets it) the kernels are interpreter objects that
    cannot be compiled: compile in child processes without it, one per architecture, in parallel."""
    if not INTERP:
        yield None
        return
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    procs = {
        arch: subprocess.Popen([sys.executable, os.path.abspath(__file__), "--check", str(arch)], env=env, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for arch in ARCHS
    }
    yield procs
    for p in procs.values():
        if p.poll() is None:
            p.kill()


@pytest.mark.parametrize("arch", ARCHS)
def test_compile_all_kernels(arch, children):
    if children is not None:
        out, err = children[arch].communicate(timeout=900)
        print(out)
        assert children[arch].returncode == 0, out[-4000:] + err[-3000:]
        assert "all kernels compiled" in out
    else:
        recs, failures = run_checks(arch)
        assert not failures, "\n".join(failures)


def _row(label, r):
    return (f"| {label} | sm_{r['arch']} | {r['num_warps']} | {r['num_stages']} | {r['n_regs']} | {r['n_spills']} | "
            f"{r['shared']} | {'yes' if r['mma'] else 'no'} | {'yes' if r['wgmma'] else 'no'} |")


def _main(argv):
    archs = [int(argv[argv.index("--check") + 1])] if "--check" in argv else list(ARCHS)
    print(f"triton {triton.__version__}")
    print("| kernel / config | arch | warps | stages | regs | spill B | smem B | mma.sync | wgmma |")
    print("|---|---|---|---|---|---|---|---|---|")
    bad = []
    for arch in archs:
        recs, failures = run_checks(arch)
        for label, r in recs:
            print(_row(label, r))
        bad += failures
    if bad:
        print("FAILURES:\n" + "\n".join(bad))
        return 1
    print("all kernels compiled")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
