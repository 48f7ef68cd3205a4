#!/usr/bin/env python
"""The benchmark suite as a script: ``python benchmarks/bench_fusion.py [options]`` is
``afkern-bench [options]`` (what is timed and how: the module docstrings of ``afkern/bench/``;
``--help``)."""

import sys

from afkern.bench import main

if __name__ == "__main__":
    sys.exit(main())
