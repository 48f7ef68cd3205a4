"""Reference cases made with AdapterHub on transformers 4.57, for the transformers-5 tests.

Not a test file. ``python tests/family_fixtures.py OUT`` (in the environment that has `adapters`,
i.e. .venv) writes, for every family and placement of the oracle harness (tests/families.py):

* ``OUT/<family>-<variant>/{a,b,c,fusion}``: the directories AdapterHub's ``save_adapter`` /
  ``save_adapter_fusion`` wrote;
* ``OUT/cases.pt``: per case the plain model's 4.57 ``state_dict``, the inputs, and AdapterHub's
  float64 and float32 outputs (last hidden states and input gradients, ``families.Outputs``).

tests/test_families_tf5.py runs it through a subprocess and loads the directories into plain
transformers-5 models with ``afkern.load_adapterhub``.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import families as F  # noqa: E402


def cases():
    return [(name, v) for name, spec in F.FAMILIES.items() for v in F.variants(spec)]


def main(out: str) -> None:
    from adapters import Fuse

    torch.set_num_threads(int(os.environ.get("AFKERN_FAMILIES_THREADS", "1")))
    records = []
    for name, variant in cases():
        spec = F.FAMILIES[name]
        plain = F.make_plain(spec)
        hub = F.make_adapterhub(spec, variant, plain=plain)
        folder = os.path.join(out, f"{name}-{variant}")
        os.makedirs(folder, exist_ok=True)
        for n in F.ADAPTER_NAMES:
            hub.save_adapter(os.path.join(folder, n), n)
        hub.save_adapter_fusion(os.path.join(folder, "fusion"), Fuse(*F.ADAPTER_NAMES))
        records.append({
            "family": name, "variant": variant, "folder": folder,
            "plain_state": {k: v.detach().clone() for k, v in plain.state_dict().items()},
            "inputs": F.make_inputs(spec),
            "hub64": F.adapterhub_outputs(hub, spec, torch.float64).__dict__,
            "hub32": F.adapterhub_outputs(hub, spec, torch.float32).__dict__,
        })
    torch.save(records, os.path.join(out, "cases.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
