"""``stfast`` command line: train, evaluate and profile forecasting models."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from . import configs, models, seed_everything
from .benchmarks.efficiency import add_bench_parser
from .check import add_check_parser

# Errors that describe bad input; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, ImportError)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: expected a device this machine has (cpu), got {name!r}: torch {torch.__version__} "
                         "sees no CUDA GPU")
    return device


def _data_source(args) -> dict:
    if args.data is not None and args.synthetic:
        raise ValueError("--data and --synthetic: expected one of them, got both")
    if args.data is None and not args.synthetic:
        raise ValueError("--data PATH or --synthetic: expected one of them, got neither")
    if args.num_steps is not None and not args.synthetic:
        raise ValueError("--num-steps: only applies to --synthetic data (real data is used whole)")
    return {"path": str(args.data) if args.data else None, "synthetic": args.synthetic,
            "num_steps": args.num_steps, "seed": args.data_seed, "graph": str(args.graph) if args.graph else None}


def _load_data(dataset: str, source: dict):
    from .data import load_dataset

    return load_dataset(dataset, source["path"], synthetic=source["synthetic"], num_steps=source["num_steps"],
                        seed=source["seed"], graph=source["graph"])


def _print_metrics(results: dict, title: str) -> None:
    from .metrics import format_metrics_table

    print(title)
    print(format_metrics_table(results))


def cmd_train(args) -> int:
    from .training.trainer import Trainer

    device = resolve_device(args.device)
    source = _data_source(args)
    data = _load_data(args.dataset, source)
    seed_everything(args.seed)
    context = models.build_context(args.model, args.dataset, data=data)
    overrides = {}
    if context.train_series is not None:  # GTS: its graph learner is sized by this data's training split
        overrides["train_steps"] = len(context.train_series)
    forecaster = _maybe_wrap(models.create(args.model, args.dataset, backend=args.backend, context=context,
                                           **overrides), args)
    training = forecaster.config["training"]
    if args.batch_size is not None:
        training["batch_size"] = _positive("--batch-size", args.batch_size)
    run_name = forecaster.spec.name + ("+stlora" if args.stlora else "")
    out_dir = Path(args.out) if args.out else Path("runs") / f"{run_name}-{data.name}"
    trainer = Trainer(forecaster, data, training, device=device, out_dir=out_dir, seed=args.seed,
                      data_source=source, progress=not args.no_progress, verbose=True)
    if args.resume:
        if not trainer.resume():
            raise FileNotFoundError(f"--resume: expected a checkpoint at {out_dir / 'last.pt'}, found none")
        print(f"resumed from {out_dir / 'last.pt'} after epoch {trainer.state.epoch}")
    elif (out_dir / "last.pt").exists():
        print(f"note: {out_dir} holds an earlier run; starting a new one over it (use --resume to continue it)")
    print(f"{forecaster.spec.name} on {data.name}: {models.count_parameters(forecaster):,} parameters, "
          f"{data.num_samples('train')} train / {data.num_samples('val')} val / {data.num_samples('test')} test "
          f"samples, device {device}")
    epochs = training["max_epochs"] if args.epochs is None else _non_negative("--epochs", args.epochs)
    state = trainer.fit(epochs)
    if trainer.trainable:
        print(f"stopped after epoch {state.epoch}; best val loss {state.best_val_loss:.4f} at epoch {state.best_epoch}")
        trainer.load_best()
    results = trainer.evaluate("test")
    _print_metrics(results, f"test metrics ({forecaster.spec.name}, {data.name}):")
    path = trainer.write_metrics(results)
    print(f"wrote {path}")
    return 0


def cmd_eval(args) -> int:
    from .training.trainer import Trainer, load_checkpoint

    checkpoint = load_checkpoint(args.checkpoint)
    device = resolve_device(args.device)
    source = checkpoint.get("data_source") if args.data is None and not args.synthetic else _data_source(args)
    if source is None:
        raise ValueError("--data PATH or --synthetic: the checkpoint does not say which data it was trained on")
    data = _load_data(checkpoint["dataset"], source)
    context = models.build_context(checkpoint["model_name"], checkpoint["dataset"], data=data)
    backend = args.backend or checkpoint["backend"]
    forecaster = models.create(checkpoint["model_name"], checkpoint["dataset"], backend=backend, context=context,
                               **checkpoint["model_args"])
    if checkpoint.get("stlora") is not None:
        from .nn.stlora import wrap_forecaster

        forecaster = wrap_forecaster(forecaster, **checkpoint["stlora"])
    forecaster.model.load_state_dict(checkpoint["model"], strict=True)
    training = dict(checkpoint["training"])
    if args.batch_size is not None:
        training["batch_size"] = _positive("--batch-size", args.batch_size)
    trainer = Trainer(forecaster, data, training, device=device, progress=False)
    results = trainer.evaluate(args.split)
    _print_metrics(results, f"{args.split} metrics ({checkpoint['model_name']}, {data.name}, {args.checkpoint}):")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def cmd_profile(args) -> int:
    from .data import synthetic_batch
    from .profiler import profile

    device = resolve_device(args.device)
    context = models.build_context(args.model, args.dataset, graph=args.graph, synthetic_seed=args.seed)
    forecaster = _maybe_wrap(models.create(args.model, args.dataset, backend=args.backend, context=context), args)
    batch_size = _positive("--batch-size", args.batch_size)
    batch, scaler = synthetic_batch(args.dataset, batch_size, seed=args.seed, device=device, return_scaler=True)
    report = profile(forecaster, batch, scaler=scaler, warmup=args.warmup, repeats=args.repeats, device=device)
    print(f"{forecaster.spec.name} ({forecaster.backend}) on {configs.canonical_dataset(args.dataset)}-shaped synthetic "
          f"data, batch {batch_size}:")
    print(report.format())
    if args.stlora:
        from .nn.stlora import parameter_overhead

        overhead = parameter_overhead(forecaster)
        print(f"stlora          +{overhead['added']:,} parameters ({overhead['percent']:.2f}% of the backbone's "
              f"{overhead['backbone']:,})")
    if args.json:
        report.to_json(args.json)
        print(f"wrote {args.json}")
    return 0


def _maybe_wrap(forecaster, args):
    """Wrap the forecaster with ST-LoRA when ``--stlora`` was given (options from the --stlora-* flags)."""
    if not args.stlora:
        return forecaster
    from .nn.stlora import wrap_forecaster

    options = {"rank": _positive("--stlora-rank", args.stlora_rank),
               "num_layers": _positive("--stlora-layers", args.stlora_layers)}
    return wrap_forecaster(forecaster, freeze_backbone=args.freeze_backbone, **options)


def _add_stlora_flags(parser) -> None:
    parser.add_argument("--stlora", action="store_true", help="wrap the model with ST-LoRA node-specific predictors")
    parser.add_argument("--stlora-rank", type=int, default=16, help="rank of the per-node adapters (paper: 16)")
    parser.add_argument("--stlora-layers", type=int, default=4, help="NALL layers per predictor (paper: 4)")
    parser.add_argument("--freeze-backbone", action="store_true", help="with --stlora: train only the adapters")


def _positive(flag: str, value: int) -> int:
    if value < 1:
        raise ValueError(f"{flag}: expected a positive integer, got {value}")
    return value


def _non_negative(flag: str, value: int) -> int:
    if value < 0:
        raise ValueError(f"{flag}: expected a non-negative integer, got {value}")
    return value


def _add_data_flags(parser) -> None:
    parser.add_argument("--data", type=Path, help="a data file or folder (data.npz + index.npz, PEMSxx.npz, "
                                                  ".npy/.npz array, METR-LA/PEMS-BAY .h5)")
    parser.add_argument("--synthetic", action="store_true", help="synthetic data with the dataset's exact shape")
    parser.add_argument("--num-steps", type=int, help="length of the synthetic series (default: the real length)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic series")
    parser.add_argument("--graph", type=Path, help="graph file (adj_mx.pkl or distance .csv), for models that use one")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    devices = ["auto", "cpu", "cuda"]

    train = sub.add_parser("train", help="train a model with its published recipe and report test metrics")
    train.add_argument("--model", required=True, help=f"one of {models.available()}")
    train.add_argument("--dataset", required=True, help=f"one of {sorted(configs.DATASETS)}")
    train.add_argument("--backend", help="'reference' for the published implementation; for HimNet an op "
                                         "backend (auto, torch, triton). Default: the model's fastest")
    _add_data_flags(train)
    train.add_argument("--epochs", type=int, help="total epochs (default: the published maximum)")
    train.add_argument("--batch-size", type=int, help="default: the published batch size")
    train.add_argument("--device", default="auto", choices=devices)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", help="output folder (default: runs/<model>-<dataset>)")
    train.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_stlora_flags(train)
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="evaluate a checkpoint: MAE/RMSE/MAPE at horizons 3, 6, 12")
    evaluate.add_argument("--checkpoint", required=True, type=Path)
    _add_data_flags(evaluate)
    evaluate.add_argument("--split", default="test", choices=["train", "val", "test"])
    evaluate.add_argument("--backend", help="default: the backend the checkpoint was trained with")
    evaluate.add_argument("--batch-size", type=int)
    evaluate.add_argument("--device", default="auto", choices=devices)
    evaluate.add_argument("--json", help="also write the metrics to this JSON file")
    evaluate.set_defaults(func=cmd_eval)

    prof = sub.add_parser("profile", help="time and memory of one training batch")
    prof.add_argument("--model", default="himnet", help=f"one of {models.available()}")
    prof.add_argument("--dataset", default="METR-LA", help=f"one of {sorted(configs.DATASETS)}")
    prof.add_argument("--batch-size", type=int, default=16)
    prof.add_argument("--backend", help="'reference' for the published implementation; for HimNet an op "
                                        "backend (auto, torch, triton). Default: the model's fastest")
    prof.add_argument("--device", default="auto", choices=devices)
    prof.add_argument("--warmup", type=int, default=3)
    prof.add_argument("--repeats", type=int, default=10)
    prof.add_argument("--seed", type=int, default=0)
    prof.add_argument("--graph", type=Path, help="road graph for models that use one (default: the synthetic "
                                                 "data's graph)")
    prof.add_argument("--json", help="write the report to this JSON file")
    _add_stlora_flags(prof)
    prof.set_defaults(func=cmd_profile)

    add_check_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as error:
        print(f"stfast {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stfast {args.command}: interrupted", file=sys.stderr)
        return 130
