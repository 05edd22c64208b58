"""Benchmarks that regenerate published tables on the user's hardware.

:mod:`stfast.benchmarks.efficiency` is ``stfast bench efficiency``: the efficiency table of HimNet
(KDD 2024) with the paper's figures, the reference implementations and stfast's kernels side by side.
"""
