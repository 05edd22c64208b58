"""Measured winners of the Triton kernels' candidate launches (written by ``bench/tune_triton.py``).

``TUNED[(device name, kernel, key)] = Launch.config`` of the fastest candidate measured for that tuning
key on that device (``stfast.kernels._utils.choose``). Empty: no GPU measurement has been committed yet,
so every launch is its kernel's heuristic default.
"""

TUNED: dict[tuple, str] = {}
