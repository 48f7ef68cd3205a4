"""``afkern-bench``: the benchmark suite of afkern (``afkern-bench --help``; ``python -m afkern.bench``).

It measures what AdapterFusion costs as the number N of fused adapters grows: afkern's fused
block and a whole model with a Fuse(N) at every layer, against AdapterHub's ``adapters`` (the
"before") and the same model without adapters (the floor), in one run on one machine. Every
provider is checked against a float64 oracle before it is timed.

One module per concern, each documenting its part at the top:

* :mod:`.models` -- model families (``--family``; BERT) and the models of a case, identical weights;
* :mod:`.providers` -- the ways of computing a case (``adapters``, afkern's backends, the baselines);
* :mod:`.cases` -- the inputs of a case and the call each mode times;
* :mod:`.check` -- the correctness guard (a float64 oracle, the "2x the reference's own error" rule);
* :mod:`.timing` -- warm-up, samples, clocks and peak memory of a group of cases;
* :mod:`.stats` -- percentiles, paired ratios, line fits and when a fit is reliable;
* :mod:`.fits` / :mod:`.targets` -- cost per added adapter; the design's targets judged on the run;
* :mod:`.env` -- the machine: its name, its results folder, versions, load;
* :mod:`.progress` -- the progress bar with an ETA (stderr);
* :mod:`.report` -- the table, ``bench.csv``, ``results.md`` and the plots;
* :mod:`.sweep` / :mod:`.cli` -- the sweep over (family, kind, N, tokens, mode); the command line;
* :mod:`.multifusion` / :mod:`.decode` -- the ``--multifusion`` and ``--decode`` cases (several
  fusions in one batch; greedy ``generate()`` with the KV cache, :mod:`.decode_profile` its profile).
"""

from .cases import BLOCK_MODES, MODEL_MODES, make_inputs, prepare_call, tokens_shape
from .check import FLOOR, Evaluation, Oracle, check_provider, evaluate, make_oracle, rel_err
from .cli import build_parser, main
from .env import device_name, device_slug, results_dir
from .fits import linear_fits, model_slopes
from .models import FAMILIES, BenchShape, Family, Setup
from .providers import AFKERN_BACKENDS, BASELINES, PROVIDERS, Provider, ProviderUnavailable, Runner, default_providers
from .report import CSV_COLUMNS, format_table
from .stats import LineFit, fit_line, paired_ratio, percentile
from .targets import target_lines
from .timing import Case, default_warmup_ms, peak_memory_mb, run_group, warm_up

__all__ = [
    "main", "build_parser",
    "FAMILIES", "Family", "BenchShape", "Setup",
    "PROVIDERS", "Provider", "ProviderUnavailable", "Runner", "AFKERN_BACKENDS", "BASELINES", "default_providers",
    "BLOCK_MODES", "MODEL_MODES", "make_inputs", "prepare_call", "tokens_shape",
    "FLOOR", "Evaluation", "Oracle", "evaluate", "make_oracle", "check_provider", "rel_err",
    "Case", "run_group", "warm_up", "default_warmup_ms", "peak_memory_mb",
    "LineFit", "fit_line", "percentile", "paired_ratio",
    "linear_fits", "model_slopes", "target_lines",
    "device_name", "device_slug", "results_dir",
    "CSV_COLUMNS", "format_table",
]
