"""What ``stfast bench efficiency`` writes: the markdown table, CSV, the figure and the terminal summary.

Everything here reads the ``{"meta": ..., "rows": [...]}`` result that
:func:`stfast.benchmarks.efficiency.run` assembles; nothing here measures.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

__all__ = ["STLORA_PREFIX", "csv_text", "markdown", "primary_memory", "summary", "write_figure"]

STLORA_PREFIX = "stlora-"  # ST-LoRA rows are named stlora-<backbone>

_MIB_COLUMNS_CUDA = (("allocated", "peak alloc MB"), ("reserved", "reserved MB"), ("process", "process MB"))
_MARKERS = {"reference": "o", "torch": "s", "triton": "^", "auto": "D", "cuda": "P", "cpu": "X"}


def primary_memory(memory: dict | None) -> float | None:
    if not memory:
        return None
    value = memory.get("allocated", memory.get("rss_growth"))
    return value if isinstance(value, (int, float)) else None



def _fmt(value, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return f"{value:,.{digits}f}{suffix}"


def _ms(value: float) -> str:
    return _fmt(value, 1 if value < 1000 else 0)


def markdown(result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    cuda = meta["device_type"] == "cuda"
    memory_headers = [title for _, title in _MIB_COLUMNS_CUDA] if cuda else ["RSS growth MB"]
    headers = ["Model", "Implementation", "Paper #Params", "Paper ms/batch", "Paper s/epoch", "Paper MB",
               "#Params", "ms/batch median [min, max]", "s/epoch (est.)"]
    if meta["full_epoch"]:
        headers.append("s/epoch (measured)")
    headers += memory_headers + ["Speed-up vs ref", "Memory ratio vs ref"]
    stlora = any(row["model"].startswith(STLORA_PREFIX) for row in rows)
    if stlora:
        headers.append("ST-LoRA time overhead")
    lines = [
        f"Efficiency table, {meta['dataset']}-shaped synthetic data, batch {meta['batch_size']}, "
        f"warm-up {meta['warmup']}, {meta['repeats']} timed steps; device: {meta['device']}; "
        f"torch {meta['torch']}, stfast {meta['stfast']}",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    for row in rows:
        paper = row["paper"]
        cells = [row["name"], row["implementation"]]
        if paper is not None:
            cells += [paper["params"]] + [_fmt(paper[key], 0) if paper[key] is not None else "N/A"
                                          for key in ("ms_per_batch", "s_per_epoch", "memory_mb")]
        else:
            cells += ["", "", "", ""]
        params = "" if row["params"] is None else f"{row['params']:,}" + (" ✓" if row["params_match_paper"] else "")
        if row["status"] == "analytic":
            cells += [params + " (analytic)", "N/A", "N/A"] + (["N/A"] if meta["full_epoch"] else [])
            cells += ["N/A"] * len(memory_headers) + ["", ""]
        elif row["status"] == "error":
            message = row["error"].replace("|", "/").replace("\n", " ")
            cells += [params, f"error: {message}", ""] + ([""] if meta["full_epoch"] else [])
            cells += [""] * len(memory_headers) + ["", ""]
        else:
            t = row["time_per_batch_ms"]
            cells += [params, f"{_ms(t['median'])} [{_ms(t['min'])}, {_ms(t['max'])}]",
                      _fmt(row["time_per_epoch_s"], 0)]
            if meta["full_epoch"]:
                cells.append(_fmt(row["full_epoch_s"], 0))
            memory = row["peak_memory_mb"]
            keys = [key for key, _ in _MIB_COLUMNS_CUDA] if cuda else ["rss_growth"]
            cells += [_fmt(memory.get(key)) for key in keys]
            cells.append(_fmt(row["speedup_vs_reference"], 2, "x") if row["speedup_vs_reference"] else
                         ("—" if row["backend"] == "reference" else ""))
            ratio = _fmt(row["memory_ratio_vs_reference"], 2, "x lower") if row["memory_ratio_vs_reference"] else ""
            if row["process_memory_ratio_vs_reference"]:
                ratio += f" (process {row['process_memory_ratio_vs_reference']:.2f}x)"
            cells.append(ratio or ("—" if row["backend"] == "reference" else ""))
        if stlora:
            overhead = row.get("stlora_time_overhead")
            cells.append("" if overhead is None else f"{overhead:+.1%}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *_footnotes(meta)]
    return "\n".join(lines) + "\n"


def _footnotes(meta: dict) -> list[str]:
    memory = ("peak alloc / reserved: the CUDA caching allocator's peaks over the timed steps; process: device memory "
              "the driver reports for the worker process (CUDA context and cache included, the paper's column "
              "appears to be this one)" if meta["device_type"] == "cuda" else
              "RSS growth: peak resident set during the timed steps minus the resident set before them (the CPU has "
              "no counterpart of the paper's GPU memory column)")
    notes = [
        "Paper: HimNet (KDD 2024) efficiency table, METR-LA, batch 16, GPU not stated; compare ratios between rows, "
        "not absolute values.",
        "HimNet-Θ′: the paper's ablation that replaces each meta-parameter pool by one ordinary GCRU per temporal "
        "context, per node and per (context, node) pair; it is not runnable, so its row gives only the parameter "
        "count derived from the configuration (the paper's 10.9B) and N/A for time and memory.",
        f"✓: the measured count rounds to the paper's figure. s/epoch (est.) = median ms/batch x "
        f"{meta['train_batches']:,} training batches.",
        f"Memory: {memory}. Ratios are the reference's memory over the backend's "
        f"({'peak allocated' if meta['device_type'] == 'cuda' else 'RSS growth'}).",
        "Each row ran in a fresh process.",
    ]
    if any(row.startswith(STLORA_PREFIX) for row in meta.get("models", [])):
        notes.append("ST-LoRA time overhead: the wrapped model's median time over its backbone's with the same "
                     "backend, minus one (the issue's target is at most +10%).")
    load = meta.get("load_average") or {}
    if meta["device_type"] == "cpu" and load.get("before") and load.get("after"):
        notes.append(f"Load average (1 min) on {meta['cpu_count']} cores: {load['before'][0]:.1f} before the run, "
                     f"{load['after'][0]:.1f} after; other work on the machine inflates CPU times.")
    notes += [f"Note: {note}" for note in meta["notes"]]
    return [f"- {note}" for note in notes]


_CSV_FIELDS = ["model", "name", "implementation", "backend", "resolved_backend", "status", "paper_params",
               "paper_ms_per_batch", "paper_s_per_epoch", "paper_memory_mb", "params", "params_match_paper",
               "ms_per_batch_median", "ms_per_batch_min", "ms_per_batch_max", "repeats", "s_per_epoch_estimated",
               "s_per_epoch_measured", "peak_allocated_mb", "peak_reserved_mb", "process_mb", "process_source",
               "rss_growth_mb", "rss_source", "speedup_vs_reference", "memory_ratio_vs_reference",
               "process_memory_ratio_vs_reference", "stlora_time_overhead", "stlora_memory_overhead", "device",
               "error"]


def csv_text(result: dict) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=_CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in result["rows"]:
        paper = row["paper"] or {}
        times = row["time_per_batch_ms"] or {}
        memory = row["peak_memory_mb"] or {}
        na = "N/A" if row["status"] == "analytic" else None
        record = {
            "model": row["model"], "name": row["name"], "implementation": row["implementation"],
            "backend": row["backend"], "resolved_backend": row["resolved_backend"], "status": row["status"],
            "paper_params": paper.get("params"), "paper_ms_per_batch": paper.get("ms_per_batch", na) or na,
            "paper_s_per_epoch": paper.get("s_per_epoch", na) or na,
            "paper_memory_mb": paper.get("memory_mb", na) or na,
            "params": row["params"], "params_match_paper": row["params_match_paper"],
            "ms_per_batch_median": times.get("median", na), "ms_per_batch_min": times.get("min", na),
            "ms_per_batch_max": times.get("max", na), "repeats": times.get("repeats"),
            "s_per_epoch_estimated": row["time_per_epoch_s"] if row["time_per_epoch_s"] is not None else na,
            "s_per_epoch_measured": row["full_epoch_s"] if row["full_epoch_s"] is not None else na,
            "peak_allocated_mb": memory.get("allocated", na), "peak_reserved_mb": memory.get("reserved", na),
            "process_mb": memory.get("process", na), "process_source": memory.get("process_source"),
            "rss_growth_mb": memory.get("rss_growth", na), "rss_source": memory.get("rss_source"),
            "speedup_vs_reference": row["speedup_vs_reference"],
            "memory_ratio_vs_reference": row["memory_ratio_vs_reference"],
            "process_memory_ratio_vs_reference": row["process_memory_ratio_vs_reference"],
            "stlora_time_overhead": row["stlora_time_overhead"],
            "stlora_memory_overhead": row["stlora_memory_overhead"],
            "device": row["device"], "error": row["error"],
        }
        writer.writerow({key: "" if value is None else value for key, value in record.items()})
    return out.getvalue()


def write_figure(result: dict, path: Path) -> str | None:
    """Save the time-vs-memory figure to ``path``; returns None, or why it was skipped.

    Left: what was measured, an arrow from each model's reference point to each of its stfast
    rows (and a dotted one from a backbone to its ST-LoRA row); right: the paper's figures.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        return "matplotlib is not installed (pip install 'stfast[plot]')"
    meta = result["meta"]
    measured = [row for row in result["rows"] if row["status"] == "ok"]
    paper = [row for row in result["rows"] if row["paper"] and row["paper"]["ms_per_batch"] is not None]
    figure, (left, right) = plt.subplots(1, 2, figsize=(14, 6))
    colours = {model: plt.cm.tab20(i % 20) for i, model in enumerate(dict.fromkeys(r["model"] for r in result["rows"]))}
    points = {(row["model"], row["backend"]): _point(row) for row in measured}
    implementations = {}
    for row in measured:
        x, y = points[(row["model"], row["backend"])]
        label = row["name"] if row["backend"] == "reference" else f"{row['name']}, {row['implementation']}"
        marker = _MARKERS.get(row["backend"], "o")
        implementations.setdefault(row["implementation"], marker)
        left.scatter([x], [y], s=70, marker=marker, color=colours[row["model"]], edgecolors="black", linewidths=0.6,
                     zorder=3)
        left.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    for start, end, style in _links(measured):
        left.annotate("", xy=points[end], xytext=points[start], zorder=2,
                      arrowprops=dict(arrowstyle="->", linestyle=style, color=colours[end[0]], lw=1.2,
                                      shrinkA=5, shrinkB=5))
    for row in paper:
        x, y = row["paper"]["ms_per_batch"], row["paper"]["memory_mb"]
        right.scatter([x], [y], s=70, marker="o", color=colours[row["model"]], edgecolors="black", linewidths=0.6,
                      zorder=3)
        right.annotate(row["name"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    memory_label = "peak allocated memory (MB)" if meta["device_type"] == "cuda" else "peak RSS growth (MB)"
    left.set(xscale="log", yscale="log", xlabel="time per training batch (ms, median)", ylabel=memory_label,
             title=f"measured: {meta['device']}\n{meta['dataset']} shape, batch {meta['batch_size']}; "
                   "arrows: reference -> stfast")
    right.set(xscale="log", yscale="log", xlabel="time per training batch (ms)", ylabel="GPU memory (MB)",
              title="paper (HimNet, KDD 2024): METR-LA, batch 16, GPU not stated")
    for axes in (left, right):
        _log_ticks(axes, ticker)
        axes.grid(True, which="both", alpha=0.3)
        axes.margins(0.15)  # room for the labels of the outermost points
    if not measured:
        left.text(0.5, 0.5, "no row measured", transform=left.transAxes, ha="center")
    else:  # the marker says which implementation, the colour and the label which model
        handles = [plt.Line2D([], [], linestyle="", marker=marker, markersize=8, markerfacecolor="lightgrey",
                              markeredgecolor="black", label=name) for name, marker in implementations.items()]
        left.legend(handles=handles, fontsize=8, loc="best", title="implementation", title_fontsize=8)
    if not paper:
        right.text(0.5, 0.5, "no paper row among the models", transform=right.transAxes, ha="center")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return None


_FLOOR_MB = 0.1  # log axes: a row whose memory did not grow is drawn at this floor


def _point(row: dict) -> tuple[float, float]:
    return row["time_per_batch_ms"]["median"], max(primary_memory(row["peak_memory_mb"]) or 0.0, _FLOOR_MB)


def _links(measured: list[dict]) -> list[tuple[tuple[str, str], tuple[str, str], str]]:
    """(from, to, line style) pairs of (model, backend): each reference to the same model's stfast
    rows (solid), each backbone row to its ST-LoRA row on the same backend (dotted)."""
    present = {(row["model"], row["backend"]) for row in measured}
    links = []
    for model, backend in present:
        if model.startswith(STLORA_PREFIX):
            backbone = (model[len(STLORA_PREFIX):], backend)
            if backbone in present:
                links.append((backbone, (model, backend), ":"))
        elif backend != "reference" and (model, "reference") in present:
            links.append(((model, "reference"), (model, backend), "-"))
    return sorted(links)


def _log_ticks(axes, ticker) -> None:
    """Plain numbers at 1, 2 and 5 per decade and no minor labels: matplotlib's default labels every
    minor tick of a log axis spanning less than a decade, and those labels overlap."""
    for axis in (axes.xaxis, axes.yaxis):
        axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=12))
        axis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:,.10g}"))
        axis.set_minor_formatter(ticker.NullFormatter())
    for label in axes.get_xticklabels():
        label.set_rotation(30)
        label.set_horizontalalignment("right")


def summary(result: dict) -> str:
    """A narrow table for the terminal: model, implementation, ms/batch, speed-up, memory ratio."""
    headers = ("model", "implementation", "ms/batch", "speed-up", "memory")
    lines = []
    for row in result["rows"]:
        if row["status"] == "analytic":
            cells = (row["name"], "analytic", "N/A", "", "")
        elif row["status"] == "error":
            cells = (row["name"], row["implementation"], "error", "", "")
        else:
            speedup, memory = row["speedup_vs_reference"], row["memory_ratio_vs_reference"]
            cells = (row["name"], row["implementation"], _ms(row["time_per_batch_ms"]["median"]),
                     _fmt(speedup, 2, "x") if speedup else ("1.00x" if row["backend"] == "reference" else ""),
                     _fmt(memory, 2, "x lower") if memory else ("1.00x" if row["backend"] == "reference" else ""))
        lines.append(cells)
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *lines)]
    text = ["  ".join(str(cell).ljust(width) for cell, width in zip(cells, widths)).rstrip()
            for cells in (headers, *lines)]
    errors = [f"error: {row['name']} ({row['implementation']}): {row['error']}" for row in result["rows"]
              if row["status"] == "error"]
    notes = [f"note: {row['name']} is not runnable (the paper's one-GCRU-per-context-and-node ablation): "
             f"{row['params']:,} parameters, derived" for row in result["rows"] if row["status"] == "analytic"]
    return "\n".join(text + errors + notes) + "\n"
