"""Roofline table of stfast's kernels (FLOPs, bytes, intensity, ideal time on H100 / H200).

    python bench/roofline.py [--out DIR]

The model lives in :mod:`stfast.benchmarks.roofline` (so that the GPU benchmarks can call
``measured_over_ideal``); this writes ``bench/results/roofline.{md,json}``.
"""

from stfast.benchmarks.roofline import main

if __name__ == "__main__":
    raise SystemExit(main())
