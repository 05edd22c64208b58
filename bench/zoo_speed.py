"""Speed of the non-fused zoo models (GWNet, STID): stfast's forward vs the slower formulations, side by side.

    python bench/zoo_speed.py [--models gwnet stid] [--batch-size 64 32] [--device cpu|cuda]
                              [--warmup 2] [--repeats 7] [--out DIR]

Every formulation runs on the *same module* (same weights, same inputs), so the only difference is the
order of operations. One training step = forward, sum loss, backward (gradients zeroed between
steps). The formulations take turns step by step (round-robin, one warm-up round first), so a
machine slowing down hurts them alike; the table gives the median [min, max] of each and its speed-up
over the first. Results go to ``bench/results/<device>/zoo_speed_<dataset>.{md,json}``.

Formulations:
- ``published-layout``: stfast's forward before this change, kept here verbatim: the published
  ``(B, C, N, L)`` layout, 1x1 ``Conv2d``, GWNet's diffusion as one einsum over the stacked supports.
- ``per-support``: GWNet as its original code is organised (one ``einsum('ncvl,vw->ncwl')`` per
  support and hop, then concatenation and a 1x1 conv), written here from the paper's description.
- ``stfast``: the current forward (node-major channels-last GWNet, GEMM-only STID).

The published-layout forwards are also the oracle of ``tests/test_zoo_speed_equivalence.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from stfast import models
from stfast.profiler import describe_device, device_slug

RESULTS = Path(__file__).resolve().parent / "results"
BATCH_SIZES = {"gwnet": 64, "stid": 32}  # the published batch sizes (Torch-MTS configs, METR-LA)


# -- the former stfast forwards (published layout) -------------------------------------------------------

def _gwnet_channels_first(model, x: torch.Tensor, supports, diffusion) -> torch.Tensor:
    """GWNet's layers in ``(B, C, N, L)`` with Conv2d everywhere; ``diffusion(gconv, h, supports)``."""
    h = F.pad(x.permute(0, 3, 2, 1), (model.receptive_field - x.shape[1], 0))
    h = model.start_conv(h)
    skip = 0
    for i in range(len(model.filter_convs)):
        residual = h
        h = torch.tanh(model.filter_convs[i](residual)) * torch.sigmoid(model.gate_convs[i](residual))
        s = model.skip_convs[i](h)
        skip = s if i == 0 else s + skip[..., -s.shape[-1]:]
        h = diffusion(model.gconv[i], h, supports) + residual[..., -h.shape[-1]:]
        h = model.bn[i](h)
    return model.end_conv_2(torch.relu(model.end_conv_1(torch.relu(skip))))


def gwnet_published_layout(model, x: torch.Tensor) -> torch.Tensor:
    """GWNet in ``(B, C, N, L)``: Conv2d everywhere, diffusion as one einsum over the stacked supports."""
    supports = torch.cat([model.supports, model.adaptive_adjacency()[None]])
    return _gwnet_channels_first(model, x, supports, _diffusion_stacked)


def _diffusion_stacked(gconv, x, supports):
    hops = [torch.einsum("bcvl,kvw->bkcwl", x, supports)]
    for _ in range(2, gconv.order + 1):
        hops.append(torch.einsum("bkcvl,kvw->bkcwl", hops[-1], supports))
    diffused = torch.stack(hops, dim=2).flatten(1, 3)
    h = gconv.mlp(torch.cat([x, diffused], dim=1))
    return F.dropout(h, gconv.dropout, training=gconv.training)


def gwnet_per_support(model, x: torch.Tensor) -> torch.Tensor:
    """GWNet organised as the original code: one node contraction per support and hop."""
    supports = list(model.supports) + [model.adaptive_adjacency()]
    return _gwnet_channels_first(model, x, supports, _diffusion_per_support)


def _diffusion_per_support(gconv, x, supports):
    out = [x]
    for a in supports:
        hop = torch.einsum("ncvl,vw->ncwl", x, a).contiguous()
        out.append(hop)
        for _ in range(2, gconv.order + 1):
            hop = torch.einsum("ncvl,vw->ncwl", hop, a).contiguous()
            out.append(hop)
    h = gconv.mlp(torch.cat(out, dim=1))
    return F.dropout(h, gconv.dropout, training=gconv.training)


def stid_published_layout(model, x: torch.Tensor) -> torch.Tensor:
    """STID in ``(B, C, N, 1)`` with the 1x1 ``Conv2d`` modules called as convolutions."""
    batch = x.shape[0]
    last = x[:, -1]
    tod = model.time_in_day_emb[(last[..., 1] * model.time_of_day_size).long()]
    dow = model.day_in_week_emb[last[..., 2].long()]
    node = model.node_emb.expand(batch, -1, -1)
    series = x[..., : model.input_dim].permute(0, 2, 1, 3).reshape(batch, model.num_nodes, -1)
    series = model.time_series_emb_layer(_channels_first(series))
    hidden = torch.cat([series, _channels_first(node), _channels_first(tod), _channels_first(dow)], dim=1)
    for block in model.encoder:
        hidden = hidden + block.fc2(block.drop(block.act(block.fc1(hidden))))
    return model.regression_layer(hidden)


def _channels_first(t):
    return t.transpose(1, 2).unsqueeze(-1)


FORMULATIONS = {
    "gwnet": {"published-layout": gwnet_published_layout, "per-support": gwnet_per_support,
              "stfast": lambda model, x: model(x)},
    "stid": {"published-layout": stid_published_layout, "stfast": lambda model, x: model(x)},
}


# -- measurement ------------------------------------------------------------------------------------------

def zoo_model(name: str, dataset: str, device):
    torch.manual_seed(0)
    context = models.build_context(name, dataset, synthetic_seed=0)
    return models.create(name, dataset, backend="reference", context=context).model.to(device)


def model_input(name: str, model, batch_size: int, device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    channels = 2 if name == "gwnet" else 3
    x = torch.randn(batch_size, 12, model.num_nodes, channels, generator=generator)
    x[..., 1] = torch.randint(0, 288, x.shape[:3], generator=generator) / 288.0
    if channels == 3:
        x[..., 2] = torch.randint(0, 7, x.shape[:3], generator=generator).float()
    return x.to(device)


def training_step(forward, model, x) -> None:
    model.zero_grad(set_to_none=True)
    forward(model, x).sum().backward()


def round_robin(name: str, dataset: str, batch_size: int, device, warmup: int, repeats: int) -> dict:
    model = zoo_model(name, dataset, device)
    model.train()
    x = model_input(name, model, batch_size, device)
    forms = FORMULATIONS[name]
    times = {label: [] for label in forms}
    for round_index in range(warmup + repeats):
        for label, forward in forms.items():
            _sync(device)
            start = time.perf_counter()
            training_step(forward, model, x)
            _sync(device)
            if round_index >= warmup:
                times[label].append((time.perf_counter() - start) * 1e3)
    return times


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def markdown(results: dict, dataset: str, device_name: str, threads: int, load: tuple) -> str:
    lines = [f"Zoo training step (forward + backward), {dataset} shape, device: {device_name}, "
             f"torch {torch.__version__}, {threads} threads; 1-minute load average {load[0]:.1f} before, "
             f"{load[1]:.1f} after (other processes share the machine: compare the ratios, interleaved, "
             f"not the absolute times)", "",
             "| model | batch | formulation | ms / step, median [min, max] | speed-up vs published-layout |",
             "|---|---|---|---|---|"]
    for name, entry in results.items():
        base = statistics.median(entry["times"]["published-layout"])
        for label, samples in entry["times"].items():
            median = statistics.median(samples)
            lines.append(f"| {name} | {entry['batch_size']} | {label} | {median:.1f} [{min(samples):.1f}, "
                         f"{max(samples):.1f}] | {base / median:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(FORMULATIONS), choices=list(FORMULATIONS))
    parser.add_argument("--batch-size", type=int, nargs="+", help="one per model (default: the published ones)")
    parser.add_argument("--dataset", default="METR-LA")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, help="results folder (default: bench/results/<device>)")
    args = parser.parse_args(argv)
    batch_sizes = args.batch_size or [BATCH_SIZES[m] for m in args.models]
    if len(batch_sizes) != len(args.models):
        parser.error(f"--batch-size: expected {len(args.models)} values (one per model), got {len(batch_sizes)}")

    device = torch.device(args.device)
    load_before = os.getloadavg()[0]
    results = {}
    for name, batch_size in zip(args.models, batch_sizes):
        times = round_robin(name, args.dataset, batch_size, device, args.warmup, args.repeats)
        results[name] = {"batch_size": batch_size, "times": times}
        print(f"{name}: " + ", ".join(f"{k} {statistics.median(v):.1f} ms" for k, v in times.items()), file=sys.stderr)
    device_name = describe_device(device)
    load = (load_before, os.getloadavg()[0])
    table = markdown(results, args.dataset, device_name, torch.get_num_threads(), load)
    print(table)
    out = args.out or RESULTS / device_slug(device_name)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"zoo_speed_{args.dataset}"
    (out / f"{stem}.md").write_text(table)
    (out / f"{stem}.json").write_text(json.dumps({"torch": torch.__version__, "device": device_name,
                                                  "threads": torch.get_num_threads(), "load_average": load,
                                                  "results": results}, indent=2) + "\n")
    print(f"wrote {out / stem}.md and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
