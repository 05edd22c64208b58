"""CPU timing of the torch backend's meta formulations (forward + backward) per axis.

``python -m stfast.ops._bench_formulations`` at the METR-LA decoder shape by default; the winners
are recorded in ``_torch_gconv.FORMULATION``.
"""

from __future__ import annotations

import time

import torch

from . import _torch_gconv as impl

NEED_ALL = {"xg": True, "e": True, "pool": True, "bias": True}


def _time(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def bench(batch=16, nodes=207, channels=67, cheb_k=2, dim=16, outputs=128, repeats=20) -> dict:
    inputs = cheb_k * channels
    xg = torch.randn(batch, nodes, inputs)
    pool, bias_pool = torch.randn(dim, inputs, outputs), torch.randn(dim, outputs)
    grad = torch.randn(batch, nodes, outputs)
    embeddings = {"S": torch.randn(nodes, dim), "T": torch.randn(batch, dim), "ST": torch.randn(batch, nodes, dim)}
    results = {}
    for axis, e in embeddings.items():
        for formulation in ("hoisted", "outer", "contract"):
            if formulation == "hoisted" and axis == "ST":
                continue  # would build the (B, N, I, O) weight

            def step():
                impl.meta_linear_forward(xg, e, pool, bias_pool, axis, formulation)
                impl.meta_linear_backward(grad, xg, e, pool, bias_pool, axis, NEED_ALL, formulation)

            results[(axis, formulation)] = _time(step, repeats)
    return results


if __name__ == "__main__":
    print(f"threads={torch.get_num_threads()}")
    for (axis, formulation), seconds in bench().items():
        print(f"{axis:>2} {formulation:>8}: {seconds * 1e3:7.2f} ms")
