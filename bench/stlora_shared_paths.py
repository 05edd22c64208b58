"""The shared ST-LoRA adapter's two paths side by side, forward + backward of one layer.

    python bench/stlora_shared_paths.py [--device cpu] [--batch 16] [--nodes 307] [--features 32]
                                        [--rank 16] [--rounds 30]

``SharedNALL(path="composed")`` (two shared GEMMs around the per-node scale) against
``path="op"`` (the per-node factors ``A * e_n``, ``B`` handed to ``stfast.ops.node_lora``) on every
node_lora backend available on the device, and the paper's per-node ``NALL`` on the same backends
for reference. Interleaved rounds (every variant once per round) so that load on a shared machine
hits all of them alike; prints median, [min, max] in ms and the ratio to the composed path.
This measurement chose the layer's default path (see ``stfast.nn.stlora.SharedNALL``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from stfast import ops
from stfast.nn.stlora import NALL, SharedNALL
from stfast.profiler import describe_device


def _step(layer, x, device):
    start = time.perf_counter()
    layer(x).sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--nodes", type=int, default=307)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    d, n, r = args.features, args.nodes, args.rank
    x = torch.randn(args.batch, n, d, device=device, requires_grad=True)
    backends = [name for name, ok in ops.available_backends(device, "node_lora").items() if ok is True]
    variants = {("shared composed", None): SharedNALL(d, d, n, r, path="composed", device=device)}
    for backend in backends:
        variants[(f"shared op ({backend})", backend)] = SharedNALL(d, d, n, r, path="op", device=device)
        variants[(f"per_node op ({backend})", backend)] = NALL(d, d, n, r, device=device)
    for layer in variants.values():
        torch.nn.init.normal_(layer.lora_b)
    times = {key: [] for key in variants}
    for round_index in range(args.rounds + 1):  # round 0 warms up, untimed
        for (name, backend), layer in variants.items():
            with ops.use_backend(backend or "auto"):
                elapsed = _step(layer, x, device)
            if round_index:
                times[(name, backend)].append(elapsed)
    base = statistics.median(times[("shared composed", None)])
    print(f"{describe_device(device)}, torch {torch.__version__}: x ({args.batch}, {n}, {d}) -> {d}, rank {r}, "
          f"forward + backward, {args.rounds} interleaved rounds")
    print("| variant | ms median [min, max] | / shared composed |")
    print("|---|---|---|")
    for (name, _), values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} [{min(values):.2f}, {max(values):.2f}] | {median / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
