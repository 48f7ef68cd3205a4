"""The reading side of GPU-measured Triton configs (kernels/tuned.py, kernels/tuned_configs.json).

``scripts/gpu_autotune.py`` writes the file on a GPU; here: the key format, the choice (the
recorded config alone, or every candidate when the file, the key or the config is missing or
stale), and that the fused core's autotuners consult it. No GPU needed.
"""

import json

import pytest
import torch

pytest.importorskip("triton")
import triton  # noqa: E402

from afkern.kernels import fusion_core, tuned  # noqa: E402


def _cands():
    return [triton.Config(dict(BLOCK_T=32, BLOCK_K=32), num_warps=4, num_stages=2),
            triton.Config(dict(BLOCK_T=64, BLOCK_K=64), num_warps=8, num_stages=3)]


def _write(tmp_path, entries):
    p = tmp_path / "tuned.json"
    p.write_text(json.dumps({"entries": entries}))
    return str(p)


KV = [("D", 768), ("R", 48), ("BLOCK_R", 64), ("STORE_G", True)]


def test_entry_key_format():
    assert tuned.entry_key("scores", 90, "torch.bfloat16", KV) == "scores|sm90|bfloat16|D=768,R=48,BLOCK_R=64,STORE_G=1"
    assert tuned.config_dict(_cands()[1]) == dict(BLOCK_T=64, BLOCK_K=64, num_warps=8, num_stages=3)


def test_choose_recorded_config(tmp_path):
    cands = _cands()
    key = tuned.entry_key("scores", 90, "bfloat16", KV)
    path = _write(tmp_path, {key: {"config": tuned.config_dict(cands[1]), "ms": 0.01}})
    assert tuned.choose("scores", cands, 90, "torch.bfloat16", KV, path=path) == [cands[1]]
    # another arch, dtype or key value: every candidate
    assert tuned.choose("scores", cands, 80, "bfloat16", KV, path=path) == cands
    assert tuned.choose("scores", cands, 90, "float16", KV, path=path) == cands
    assert tuned.choose("scores", cands, 90, "bfloat16", KV[:3] + [("STORE_G", False)], path=path) == cands


def test_choose_falls_back_on_stale_or_bad_files(tmp_path):
    cands = _cands()
    key = tuned.entry_key("mix", 90, "bfloat16", KV)
    stale = _write(tmp_path, {key: {"config": dict(BLOCK_T=256, BLOCK_K=32, num_warps=4, num_stages=2)}})
    assert tuned.choose("mix", cands, 90, "bfloat16", KV, path=stale) == cands  # no longer a candidate
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert tuned.choose("mix", cands, 90, "bfloat16", KV, path=str(bad)) == cands
    assert tuned.choose("mix", cands, 90, "bfloat16", KV, path=str(tmp_path / "missing.json")) == cands


def test_env_selects_or_switches_off_the_file(tmp_path, monkeypatch):
    cands = _cands()
    path = _write(tmp_path, {tuned.entry_key("scores", 90, "bfloat16", KV): {"config": tuned.config_dict(cands[0])}})
    monkeypatch.setenv(tuned.ENV, path)
    assert tuned.tuned_path() == path
    assert tuned.choose("scores", cands, 90, "bfloat16", KV) == [cands[0]]
    monkeypatch.setenv(tuned.ENV, "off")
    assert tuned.tuned_path() is None
    assert tuned.choose("scores", cands, 90, "bfloat16", KV) == cands


def test_prune_fn_reads_the_launch_arguments(tmp_path, monkeypatch):
    cands = _cands()
    kv = [("D", 1024), ("R", 64), ("NADP", 16), ("APPLY_ACT", False)]
    monkeypatch.setenv(tuned.ENV, _write(tmp_path, {tuned.entry_key("mix", 90, "float16", kv):
                                                    {"config": tuned.config_dict(cands[1])}}))
    prune = tuned.prune_fn("mix", 90, fusion_core.AUTOTUNE_KEYS["mix"], "ZG")
    zg = torch.empty(2, 3, dtype=torch.float16)
    assert prune(cands, dict(ZG=zg, D=1024, R=64, NADP=16), APPLY_ACT=False, BLOCK_N=16) == [cands[1]]
    assert prune(cands, dict(ZG=zg, D=1024, R=64, NADP=8), APPLY_ACT=False) == cands
    assert prune(cands, dict(ZG=zg, D=1024, R=64), APPLY_ACT=False) == cands  # a key missing: no choice


def test_fused_core_autotuners_consult_the_file():
    for which in ("scores", "mix"):
        at = fusion_core._tuned(which, torch.device("cpu"), False)
        assert list(at.keys) == fusion_core.AUTOTUNE_KEYS[which]
        assert at.early_config_prune is not None
        assert set(fusion_core.AUTOTUNE_KEYS[which]) <= set(at.arg_names)
