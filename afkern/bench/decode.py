"""``afkern-bench --decode``: greedy ``generate()`` with the KV cache (issue 18, item 3).

The case: a GPT-2 language model (``GPT2LMHeadModel``, random init from a config, no download) at
``--hidden-size`` (768), ``--heads`` (12), ``--intermediate-size`` (3072), ``--layers`` layers
(default 4) and a ``--vocab-size`` vocabulary (default 5000: a 15 MB float32 LM head, read once per
token), N = ``--model-n-adapters`` Pfeiffer adapters (default 8) under one dynamic Fuse(N) at every
layer. A batch of ``--decode-batch`` prompts (default 1 and 8) of ``--prompt-len`` random tokens
(default 32) is continued by ``--new-tokens`` tokens (default 32; 16 with ``--quick``), greedily, with
the KV cache, no early stop (no EOS token). Providers, all on the same base weights:

* ``plain``    -- the base model, no adapters (the floor);
* ``afkern``   -- ``afkern.patch_model`` on a copy of it, backend ``--decode-backend`` (default
  ``torch``), adapter and fusion weights perturbed as every bench case does (``models.perturb``:
  a softmax far from uniform, so a wrong score path shows);
* ``adapters`` -- AdapterHub's ``adapters``: ``adapters.init`` on another copy, the adapters and the
  fusion loaded from the directories ``afkern.save_adapterhub`` wrote (the same weights), ``Fuse``
  active;
* ``gemm_floor`` -- NOT a model (its outputs are wrong, so it is not checked): a copy of afkern's
  model whose every block runs nothing but the two GEMMs of its folded inference weights
  (:func:`gemm_floor`), through the same hooks: what a decoding step of the folded layer cannot
  avoid paying on this device, the floor under ``afkern``'s ratio;
* ``hooks_floor`` -- the plain model through afkern's sites: a copy of afkern's model whose every
  block returns ``h + r``, AdapterHub's output without adapters (:func:`hooks_floor`; the plain
  model's numbers, bit for bit). GPT-2 is a hooked family, so this is what the hooks alone cost;
  ``gemm_floor - hooks_floor`` is the cost of the folded weights' bytes.

Correctness, before timing. The oracle is afkern's ``reference`` path in float64 on the same
weights, run teacher-forced (one uncached forward) over each provider's generated sequence; a
provider's error is ``||logits - oracle|| / ||oracle||`` over every generated step, its logits
recomputed along its sequence as decoding computes them (prefill, then one token at a time with
the KV cache) in its own dtype (``generate()`` rounds the logits it returns to float32). afkern
and ``adapters`` are timed only if (a) they generate the same tokens as each other and (b) each
one's error is at most ``max(2 * e_ref, FLOOR[dtype])``, ``e_ref`` being the error of the
``reference`` path's own cached generation in the run's dtype (``check.py``'s rule).

Timing: one group per batch size, every case in it round-robin (``timing.run_group``: warm-up,
``repeats`` samples, the starting case rotating), so machine load hits every provider alike. A
call is one ``generate()``: the prompt's prefill (which gives the first token) and
``new_tokens - 1`` decoding steps. Reported per provider: ms per generated token (call time / new
tokens, median and p20-p80 of the samples), tokens per second (batch / ms per token at the
median; its p20-p80 from ms per token's p80-p20), the ratio to ``plain`` and the speed-up over
``adapters`` (medians over rounds of the per-round ratio), peak memory. Each provider's prefill
alone (``prefill``: the prompt's forward with the cache) is timed in the same group, so each round
also gives the time of one decoding step, ``(generate - prefill) / (new_tokens - 1)``:
``decode_ms_per_step`` and ``decode_ratio_to_plain``, the per-token cost without the prompt's.
``TARGETS`` are issue 18's ratios to the plain model per token. Writes ``decode.csv`` and
``decode.json`` (atomically) under ``OUTPUT_DIR/<device-slug>/``; ``--decode-profile`` also writes ``decode_profile.txt`` (where
afkern's per-token time goes at batch 1: :mod:`.decode_profile`).
"""

from __future__ import annotations

import copy
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .._io import atomic_write_json
from . import env
from .options import case_group, positive_ints
from .check import floor_for, rel_err
from .report import write_csv
from .stats import paired_ratio, percentile
from .timing import Case, run_cases

__all__ = ["add_arguments", "run", "build_models", "make_prompt", "generate", "prefill", "cached_logits", "check", "decode_rows",
           "PROVIDERS", "TARGETS", "COLUMNS"]

PROVIDERS = ("plain", "afkern", "adapters", "gemm_floor", "hooks_floor")
PREFILL = "/prefill"  # the case timing a provider's prefill alone, in the same group
TARGETS = {1: 1.15, 8: 1.10}  # afkern / plain per token after issue 18's restructure, by batch size
COLUMNS = ["batch", "provider", "status", "rel_err", "ref_rel_err", "ms_per_token", "p20_ms_per_token",
           "p80_ms_per_token", "tokens_per_s", "p20_tokens_per_s", "p80_tokens_per_s", "call_ms", "repeats", "inner",
           "ratio_to_plain", "speedup_vs_adapters", "prefill_ms", "decode_ms_per_step", "p20_decode_ms_per_step",
           "p80_decode_ms_per_step", "decode_ratio_to_plain", "peak_mem_mb", "prompt_len", "new_tokens", "n_adapters",
           "layers",
           "hidden", "vocab", "backend", "dtype", "device", "threads", "clock", "load1", "torch", "transformers",
           "adapters", "afkern"]


def add_arguments(p) -> None:
    g = case_group(p, "greedy decoding with the KV cache", "--decode",
                   "greedy generate() with the KV cache of a GPT-2 LM (4 layers, Fuse(8) by default) for the plain "
                   "model, afkern and AdapterHub, ms per token and tokens/s (writes decode.csv, decode.json)")
    g.add_argument("--decode-batch", default="1,8", help="--decode: batch sizes (comma-separated)")
    g.add_argument("--prompt-len", type=int, default=32, help="--decode: prompt tokens")
    g.add_argument("--new-tokens", type=int, default=None, help="--decode: generated tokens (default 32; 16 with --quick)")
    g.add_argument("--vocab-size", type=int, default=5000, help="--decode: vocabulary (the LM head's width)")
    g.add_argument("--decode-backend", default="torch", help="--decode: afkern's backend")
    g.add_argument("--decode-profile", action="store_true",
                   help="--decode: also profile afkern's and the plain model's generate() at batch 1 (cProfile by "
                        "function, torch.profiler by op) into decode_profile.txt")


# ---------------------------------------------------------------------------------- models
def build_models(shape, n: int, layers: int, vocab: int, device, dtype, seed: int, backend: str = "torch",
                 with_adapters: bool = True) -> Tuple[nn.Module, Optional[nn.Module], str, nn.Module]:
    """(afkern LM, AdapterHub LM with the same weights or None, why it is None or "ok", plain LM),
    ``eval()``, frozen, on ``device`` in ``dtype``. The fusion is named ``f0`` in both."""
    import transformers

    import afkern

    from .models import adapters_available, perturb
    from .multifusion import hub_copy

    shape.validate()
    cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=shape.hidden, n_layer=layers, n_head=shape.heads,
                                  n_inner=shape.intermediate, n_positions=1024, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    pm = transformers.GPT2LMHeadModel(cfg).eval()
    fm = copy.deepcopy(pm)
    names = [f"task{i}" for i in range(n)]
    afkern.patch_model(fm, names, afkern.AdapterConfig.pfeiffer(reduction_factor=shape.reduction_factor),
                       fusion_config=False, backend=backend)
    afkern.add_fusion(fm, "f0", names)
    afkern.set_active_fusion(fm, "f0")
    perturb(fm, torch.Generator().manual_seed(seed + 1))
    calibrate(fm, make_prompt(2, 16, vocab, seed + 3, "cpu"))
    am, why = None, "not asked for"
    if with_adapters:
        ok, why = adapters_available()
        if ok:
            from adapters.composition import Fuse

            am = hub_copy(fm, pm, names, 1)
            am.set_active_adapters(Fuse(*names, name="f0"))
    models = []
    for m in (fm, am, pm):
        if m is not None:
            for p in m.parameters():
                p.requires_grad_(False)
            m = m.eval().to(device=device, dtype=dtype)
        models.append(m)
    return models[0], models[1], why, models[2]


SCORE_RANGE = 3.0  # calibrate(): the mean per-token range of the fusion scores (N = 8: max p about 0.5)


@torch.no_grad()
def calibrate(fm: nn.Module, ids: torch.Tensor, rounds: int = 6) -> nn.Module:
    """Scale every fused block's query map (weight and bias) until the mean per-token range of its
    fusion scores, ``max_n s - min_n s = max log p - min log p``, is ``SCORE_RANGE`` (within 10%).

    Why: GPT-2's random init keeps the residual stream at the embeddings' std 0.02, so perturbed
    query/key maps (``models.perturb``) still give scores near 0 and a uniform softmax, under which
    a wrong score path would go unseen. The scores are linear in the query map, so one round sets a
    block exactly for the inputs it saw; a few more settle the later blocks' changed inputs.
    Deterministic; applied before AdapterHub's copy is made, so both carry the same weights."""
    import afkern

    blocks = [b for _, b in afkern.fused_blocks(fm)]
    afkern.record_fusion_weights(fm)
    try:
        for _ in range(rounds):
            fm(ids)
            done = True
            for b in blocks:
                logp = b.fusion_weights.double().clamp_min(1e-300).log().reshape(-1, b.fusion_weights.shape[-1])
                spread = (logp.max(-1).values - logp.min(-1).values).mean().item()
                factor = SCORE_RANGE / max(spread, 1e-12)
                if abs(factor - 1.0) > 0.1:
                    done = False
                    q = b.query
                    q.weight.mul_(factor)
                    q.bias.mul_(factor)
            if done:
                break
    finally:
        afkern.record_fusion_weights(fm, False)
    return fm


def gemm_floor(fm: nn.Module) -> nn.Module:
    """A copy of ``fm`` (eval, folded weights) whose every block computes only
    ``x = h + r; Z = (x w_in + b_in)[:, :N r]; out = x + relu(Z) Wu`` -- the two GEMMs of the folded
    layer (``afkern.ops.fold``: 2 N r + N and d output columns) without the row op, the epilogue or
    any setup code. Not AdapterFusion: the cost floor of a decoding step (module doc)."""
    import afkern

    floor = copy.deepcopy(fm)
    for _, b in afkern.fused_blocks(floor):
        with torch.no_grad():
            fw = b.folded_weights()
        nr = b.n_adapters * b.bottleneck
        w_in, b_in, w_up = fw.w_in, fw.b_in, fw.w_out[:nr]

        def bare(h, r, w_in=w_in, b_in=b_in, w_up=w_up, nr=nr):
            x = (h + r).reshape(-1, h.shape[-1])
            z = torch.addmm(b_in, x, w_in)[:, :nr].relu_()
            return torch.addmm(x, z, w_up).reshape(h.shape)

        b.adapter_forward = bare  # an instance attribute: the site calls it in place of the layer
    return floor


def hooks_floor(fm: nn.Module) -> nn.Module:
    """A copy of ``fm`` whose every block returns ``h + r`` (AdapterHub's output without adapters:
    the plain model's), through the same sites and hooks: their cost alone (module doc)."""
    import afkern

    floor = copy.deepcopy(fm)
    for _, b in afkern.fused_blocks(floor):
        b.adapter_forward = torch.add  # an instance attribute: the site calls it in place of the layer
    return floor


def make_prompt(batch: int, prompt_len: int, vocab: int, seed: int, device) -> torch.Tensor:
    """``[batch, prompt_len]`` random token ids (seeded)."""
    g = torch.Generator().manual_seed(seed + 7 + batch)
    return torch.randint(0, vocab, (batch, prompt_len), generator=g).to(device)


def generate(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy ``generate()`` with the KV cache: ``ids`` followed by ``new_tokens`` tokens, no early stop."""
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)


def prefill(model: nn.Module, ids: torch.Tensor):
    """The prompt's forward with the KV cache, the first step of ``generate()`` (last position's logits only)."""
    with torch.no_grad():
        return model(ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)


# ---------------------------------------------------------------------------------- check
def cached_logits(model: nn.Module, seq: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """``model``'s logits over ``seq`` as greedy decoding computes them -- the prompt's prefill,
    then one token at a time with the KV cache -- at the positions that predicted the generated
    tokens, in the model's dtype (``generate()``'s own logits are rounded to float32)."""
    mask = torch.ones_like(seq)
    with torch.no_grad():
        out = model(seq[:, :prompt_len], attention_mask=mask[:, :prompt_len], use_cache=True)
        steps = [out.logits[:, -1]]
        for t in range(prompt_len, seq.shape[1] - 1):
            out = model(seq[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=out.past_key_values,
                        use_cache=True)
            steps.append(out.logits[:, -1])
    return torch.stack(steps, 1)  # [B, new_tokens, vocab]


def _oracle_logits(oracle: nn.Module, seq: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """The float64 oracle's logits, one uncached forward over ``seq``, at the same positions."""
    with torch.no_grad():
        out = oracle(seq, attention_mask=torch.ones_like(seq), use_cache=False).logits
    return out[:, prompt_len - 1:seq.shape[1] - 1]


def check(fm: nn.Module, am: Optional[nn.Module], ids: torch.Tensor, new_tokens: int) -> Dict[str, dict]:
    """The correctness guard of the module doc. Returns per provider (``afkern``, ``adapters``,
    ``reference``): ``sequences``, ``rel_err`` against the float64 oracle, ``status``."""
    import afkern

    dtype = next(fm.parameters()).dtype
    oracle = copy.deepcopy(fm).to(torch.float64)
    afkern.set_backend(oracle, "reference")
    ref = copy.deepcopy(fm)
    afkern.set_backend(ref, "reference")
    models = {"afkern": fm, "reference": ref, **({"adapters": am} if am is not None else {})}
    res: Dict[str, dict] = {}
    for name, m in models.items():
        seq = generate(m, ids, new_tokens)
        got = cached_logits(m, seq, ids.shape[1])
        res[name] = dict(sequences=seq, rel_err=rel_err(got, _oracle_logits(oracle, seq, ids.shape[1])), status="ok")
    bound = max(2.0 * res["reference"]["rel_err"], floor_for(dtype))
    for name, r in res.items():
        if not r["rel_err"] <= bound:
            r["status"] = (f"mismatch: logits rel err {r['rel_err']:.2e} > {bound:.1e} (2x the {str(dtype)[6:]} "
                           f"reference's {res['reference']['rel_err']:.1e}, floor {floor_for(dtype):.0e})")
    if am is not None and not torch.equal(res["afkern"]["sequences"], res["adapters"]["sequences"]):
        differ = (res["afkern"]["sequences"] != res["adapters"]["sequences"]).any(0).nonzero()
        step = int(differ[0]) - ids.shape[1]
        for name in ("afkern", "adapters"):
            if res[name]["status"] == "ok":
                res[name]["status"] = f"mismatch: afkern and adapters generate different tokens from step {step}"
    return res


# ---------------------------------------------------------------------------------- rows
def _decode_steps(gen: List[float], pre: List[float], new_tokens: int) -> List[float]:
    """Per round, the time of one decoding step after the prefill: (generate - prefill) / (new_tokens - 1)."""
    if new_tokens < 2:
        return []
    return [(g - p) / (new_tokens - 1) for g, p in zip(gen, pre)]


def decode_rows(cases: List[Case], batch: int, new_tokens: int, checks: Dict[str, dict], base: dict) -> List[dict]:
    """One row per provider of a timed group (module doc); ``base``: the columns every row shares."""
    by = {c.provider: c for c in cases}
    rows = []
    for p in PROVIDERS:
        c = by.get(p)
        s = c.samples if c else []
        per_tok = [ms / new_tokens for ms in s]
        med, p20, p80 = (percentile(per_tok, q) for q in (0.5, 0.2, 0.8))
        ck = checks.get(p, {})
        other = lambda q: by[q].samples if q in by and s else []  # noqa: E731
        steps = _decode_steps(s, other(p + PREFILL), new_tokens)
        plain_steps = _decode_steps(other("plain"), other("plain" + PREFILL), new_tokens)
        rows.append(dict(
            base, batch=batch, provider=p,
            status=ck.get("status", "ok" if c else "not run"), rel_err=ck.get("rel_err", float("nan")),
            ref_rel_err=checks.get("reference", {}).get("rel_err", float("nan")) if ck else float("nan"),
            ms_per_token=med, p20_ms_per_token=p20, p80_ms_per_token=p80, tokens_per_s=batch * 1e3 / med,
            p20_tokens_per_s=batch * 1e3 / p80, p80_tokens_per_s=batch * 1e3 / p20,
            call_ms=percentile(s, 0.5), repeats=len(s), inner=c.inner if c else 0,
            ratio_to_plain=paired_ratio(s, other("plain")) if other("plain") else float("nan"),
            speedup_vs_adapters=paired_ratio(other("adapters"), s) if other("adapters") else float("nan"),
            prefill_ms=percentile(other(p + PREFILL), 0.5), decode_ms_per_step=percentile(steps, 0.5),
            p20_decode_ms_per_step=percentile(steps, 0.2), p80_decode_ms_per_step=percentile(steps, 0.8),
            decode_ratio_to_plain=paired_ratio(steps, plain_steps) if steps and plain_steps else float("nan"),
            peak_mem_mb=c.peak_mb if c else float("nan"), load1=env.load1()))
    return rows


def summary(rows: List[dict]) -> str:
    """Per batch: every provider's ms/token and tokens/s, ratios to the plain model, the targets."""
    out = []
    for b in sorted({r["batch"] for r in rows}):
        at = {r["provider"]: r for r in rows if r["batch"] == b}
        out.append(f"batch {b}: " + "; ".join(
            f"{p} {at[p]['ms_per_token']:.2f} ms/token ({at[p]['tokens_per_s']:.0f} tokens/s, "
            f"{at[p]['ratio_to_plain']:.3f}x plain)" for p in PROVIDERS if p in at and at[p]["repeats"]))
        a, t = at.get("afkern"), TARGETS.get(b)
        if t is not None and a is not None and a["repeats"]:
            verdict = "met" if a["ratio_to_plain"] <= t else "NOT met"
            out.append(f"  afkern / plain per token {a['ratio_to_plain']:.3f} (issue 18 target <= {t}: {verdict}); "
                       f"per decoding step after the prefill {a['decode_ratio_to_plain']:.3f} "
                       f"({a['decode_ms_per_step']:.2f} ms, plain {at['plain']['decode_ms_per_step']:.2f} ms)")
        for p in PROVIDERS:
            if p in at and at[p]["status"] != "ok":
                out.append(f"  {p} not timed: {at[p]['status']}")
    return "\n".join(out)


# ---------------------------------------------------------------------------------- run
def run(args, cfg: dict, out_dir: str, argv: List[str]) -> int:
    """The decoding benchmark (module doc); returns the exit status (1 if a provider failed its check)."""
    import os

    import afkern

    device, dtype = cfg["device"], cfg["dtype"]
    batches = positive_ints(args.decode_batch, "--decode-batch")
    new_tokens = args.new_tokens if args.new_tokens is not None else (16 if args.quick else 32)
    layers, n = args.layers or 4, (args.model_n_adapters or [8])[0]
    for name, v in (("--prompt-len", args.prompt_len), ("--new-tokens", new_tokens), ("--vocab-size", args.vocab_size)):
        if v < 1:
            raise SystemExit(f"afkern-bench: {name} must be positive, got {v}")
    versions = env.library_versions()
    meta = dict(device=env.device_name(device), threads=torch.get_num_threads(), dtype=str(dtype).replace("torch.", ""),
                clock="cuda-events" if device.type == "cuda" else cfg["clock"], **versions)
    print(f"afkern-bench --decode {afkern.__version__} on {meta['device']}, {meta['dtype']}, {meta['threads']} threads: "
          f"GPT-2 LM, {layers} layers, d={cfg['shape'].hidden}, vocab {args.vocab_size}, Fuse({n}), batches {batches}, "
          f"prompt {args.prompt_len} + {new_tokens} new tokens, afkern backend {args.decode_backend}", flush=True)
    try:
        fm, am, why, pm = build_models(cfg["shape"], n, layers, args.vocab_size, device, dtype, cfg["seed"],
                                       args.decode_backend)
    except (RuntimeError, ValueError) as exc:
        raise SystemExit(f"afkern-bench --decode: {exc}") from None
    if am is None:
        print(f"  adapters skipped: {why}", flush=True)
    base = dict(prompt_len=args.prompt_len, new_tokens=new_tokens, n_adapters=n, layers=layers,
                hidden=cfg["shape"].hidden, vocab=args.vocab_size, backend=args.decode_backend,
                **{k: meta[k] for k in ("dtype", "device", "threads", "clock")},
                **{k: versions.get(k, "") for k in ("torch", "transformers", "adapters", "afkern")})
    models = {"plain": pm, "afkern": fm, "adapters": am, "gemm_floor": gemm_floor(fm), "hooks_floor": hooks_floor(fm)}
    rows: List[dict] = []
    csv_path, json_path = os.path.join(out_dir, "decode.csv"), os.path.join(out_dir, "decode.json")
    t0 = time.perf_counter()
    for b in batches:
        ids = make_prompt(b, args.prompt_len, args.vocab_size, cfg["seed"], device)
        checks = check(fm, am, ids, new_tokens)
        ok = {p: m for p, m in models.items() if m is not None and checks.get(p, {}).get("status", "ok") == "ok"}
        cases = [Case(p, (lambda m=m: lambda: generate(m, ids, new_tokens))) for p, m in ok.items()]
        cases += [Case(p + PREFILL, (lambda m=m: lambda: prefill(m, ids))) for p, m in ok.items()]
        run_cases(cases, cfg, device)
        rows += decode_rows(cases, b, new_tokens, checks, base)
        print("  " + summary([r for r in rows if r["batch"] == b]).replace("\n", "\n  "), flush=True)
        write_csv(csv_path, rows, COLUMNS)  # after every batch: an interrupted run keeps what it measured
    text = summary(rows)
    atomic_write_json(json_path, dict(command="afkern-bench " + " ".join(argv), meta=meta, rows=rows, summary=text,
                                      targets={str(k): v for k, v in TARGETS.items()}))
    written = [csv_path, json_path]
    if args.decode_profile:
        from .decode_profile import profile_report

        written.append(profile_report(os.path.join(out_dir, "decode_profile.txt"), pm, fm,
                                      make_prompt(1, args.prompt_len, args.vocab_size, cfg["seed"], device), new_tokens,
                                      generate))
    print("\n" + text)
    print(f"\nwrote {', '.join(written)} in {time.perf_counter() - t0:.0f}s")
    return 0 if all(r["status"] == "ok" for r in rows if r["provider"] != "adapters" or am is not None) else 1
