"""The stfast command line: train, evaluate, profile and check forecasting models, run benchmarks.

Every argument is checked before any data is loaded or any model is built: a wrong name, a
non-positive count, a device or backend this machine does not have, or an output path whose
folder does not exist ends the command at once with exit code 2 and a message naming the flag.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from . import __version__, configs, models, seed_everything
from .benchmarks.efficiency import add_bench_parser
from .check import add_check_parser
from .overrides import apply_overrides

# Errors that describe bad input; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, ImportError)

DESCRIPTION = ("Train, evaluate and profile spatio-temporal forecasting models (HimNet, ST-LoRA and a zoo of "
               "baselines) and check stfast's fused kernels against the published implementations.")
DEVICES = ["auto", "cpu", "cuda"]
DEVICE_HELP = "where to run: cpu, cuda, or auto (cuda when torch sees a GPU, else cpu; default)"


# ---------------------------------------------------------------------------------- validation


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: expected a device this machine has (cpu), got {name!r}: torch {torch.__version__} "
                         "sees no CUDA GPU")
    return device


def _positive(flag: str, value: int | None) -> int | None:
    if value is not None and value < 1:
        raise ValueError(f"{flag}: expected a positive integer, got {value}")
    return value


def _check_model_and_dataset(model: str, dataset: str) -> str:
    """The canonical dataset name, once ``model`` is known and has a configuration for it."""
    models.model_module(model)
    dataset = configs.canonical_dataset(dataset)
    configs.load(model, dataset)
    return dataset


def _ops_of(backend: str, stlora: bool) -> list[str]:
    """The stfast ops a model runs on ``backend`` (the fused models' graph convolution, ST-LoRA's layers)."""
    return (["meta_gconv"] if backend not in ("reference", "auto") else []) + (["node_lora"] if stlora else [])


def check_backend(model: str, backend: str | None, device: torch.device, stlora: bool = False) -> None:
    """Refuse a backend ``model`` does not have, or one that cannot run on ``device`` on this machine."""
    if backend is None:
        return
    allowed = models.backends(model)
    if backend == "auto" and "auto" in allowed:
        return  # auto picks a backend that runs here, for every op
    if backend not in allowed:
        raise ValueError(f"--backend: expected one of {allowed} for {model}, got {backend!r}")
    from . import ops

    for op in _ops_of(backend, stlora and backend != "reference"):
        status = ops.available_backends(device, op)
        if status[backend] is not True:
            usable = [name for name, ok in status.items() if ok is True]
            raise ValueError(f"--backend: {backend!r} cannot run {op} on {device.type} here ({status[backend]}); "
                             f"backends that can: {', '.join(['auto', 'reference', *usable])}")


def _check_output_file(flag: str, path) -> None:
    """An output file must be writable where asked, before minutes of work are spent on it."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag}: expected a file path, got the folder {path}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{flag}: the folder {path.parent} does not exist (got {path})")


def _check_output_folder(flag: str, path) -> None:
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise ValueError(f"{flag}: expected a folder, got the file {path}")


def _check_stlora_flags(args) -> None:
    if args.stlora:
        _positive("--stlora-rank", args.stlora_rank)
        _positive("--stlora-layers", args.stlora_layers)
    if args.freeze_backbone and not args.stlora:
        raise ValueError("--freeze-backbone: only with --stlora (it freezes the backbone under the adapters)")
    if getattr(args, "init_from", None) is not None and not Path(args.init_from).is_file():
        raise FileNotFoundError(f"--init-from: no such file {args.init_from}")


# ------------------------------------------------------------------------------------- data


def _data_source(args) -> dict:
    if args.data is not None and args.synthetic:
        raise ValueError("--data and --synthetic: expected one of them, got both")
    if args.data is None and not args.synthetic:
        raise ValueError("--data PATH or --synthetic: expected one of them, got neither")
    if args.num_steps is not None and not args.synthetic:
        raise ValueError("--num-steps: only applies to --synthetic data (real data is used whole)")
    if args.data is not None and not Path(args.data).exists():
        raise FileNotFoundError(f"--data: no such file or folder {args.data}")
    if args.graph is not None and not Path(args.graph).is_file():
        raise FileNotFoundError(f"--graph: no such file {args.graph}")
    # Absolute, so that `eval` of the checkpoint finds the data from any folder.
    return {"path": str(Path(args.data).resolve()) if args.data else None, "synthetic": args.synthetic,
            "num_steps": args.num_steps, "seed": args.data_seed,
            "graph": str(Path(args.graph).resolve()) if args.graph else None}


def _load_data(dataset: str, source: dict):
    from .data import load_dataset

    return load_dataset(dataset, source["path"], synthetic=source["synthetic"], num_steps=source["num_steps"],
                        seed=source["seed"], graph=source["graph"])


# ----------------------------------------------------------------------------------- output


def _print_metrics(results: dict, title: str) -> None:
    from .metrics import format_metrics_table

    print(title)
    print(format_metrics_table(results))


def backend_label(forecaster, device: torch.device) -> str:
    """What runs: ``"auto -> cpu"`` (the backend asked for, then the one stfast's ops run on here), or
    ``"reference"`` (plus where ST-LoRA's node_lora runs when the model is wrapped)."""
    from . import ops

    stlora = "stlora" in forecaster.config
    if forecaster.backend == "reference":
        if not stlora:
            return "reference"
        return f"reference; node_lora -> {ops.resolve_backend('node_lora', device)}"
    with ops.use_backend(forecaster.backend):
        resolved = {op: ops.resolve_backend(op, device) for op in ["meta_gconv"] + ["node_lora"] * stlora}
    if len(set(resolved.values())) == 1:
        return f"{forecaster.backend} -> {next(iter(resolved.values()))}"
    return f"{forecaster.backend} -> " + ", ".join(f"{op} {name}" for op, name in resolved.items())


def model_label(forecaster, device: torch.device) -> str:
    """``"himnet + ST-LoRA (rank 16, 4 layers) (auto -> cpu)"``; marks configs that are not published."""
    label = forecaster.spec.name
    stlora = forecaster.config.get("stlora")
    if stlora is not None:
        details = [f"rank {stlora.get('rank')}", f"{stlora.get('num_layers')} layers"]
        if stlora.get("adapter") not in (None, "per_node"):
            details.append(f"{stlora['adapter']} adapter")
        if stlora.get("freeze_backbone"):
            details.append("backbone frozen")
        label += f" + ST-LoRA ({', '.join(details)})"
    label += f" ({backend_label(forecaster, device)})"
    origin = forecaster.config.get("origin")
    if origin and origin != "published":
        label += f" [{origin}]"
    return label


def _version() -> str:
    return f"stfast {__version__} (torch {torch.__version__}, python {platform.python_version()})"


# ---------------------------------------------------------------------------------- commands


def _check_train_args(args) -> tuple[torch.device, str]:
    device = resolve_device(args.device)
    _positive("--epochs", args.epochs)
    _positive("--batch-size", args.batch_size)
    _positive("--max-batches-per-epoch", args.max_batches_per_epoch)
    _check_stlora_flags(args)
    dataset = _check_model_and_dataset(args.model, args.dataset)
    check_backend(args.model, args.backend, device, stlora=args.stlora)
    _check_numerics_flags(args, device)
    _check_output_folder("--out", args.out)
    return device, dataset


def cmd_train(args) -> int:
    from .training import distributed

    device, dataset = _check_train_args(args)
    job = distributed.setup(device)  # under torchrun: this rank's place in the job, else None
    try:
        return _train(args, device if job is None else job.device(device), dataset, job)
    finally:
        distributed.teardown()  # after _train has dropped its DistributedDataParallel trainer


def _train(args, device, dataset, job) -> int:
    from .training import distributed
    from .training.finetune import BackboneGuard, backbone_of, init_backbone
    from .training.trainer import Trainer

    config_overrides = apply_overrides(configs.load(args.model, dataset), args.set)  # --set, checked before the data
    source = _data_source(args)
    data = _load_data(dataset, source)
    seed_everything(args.seed)
    context = models.build_context(args.model, args.dataset, data=data)
    overrides = dict(config_overrides["model"])
    if context.train_series is not None:  # GTS: its graph learner is sized by this data's training split
        overrides["train_steps"] = len(context.train_series)
    forecaster = _maybe_wrap(models.create(args.model, args.dataset, backend=args.backend, context=context,
                                           **overrides), args)
    _maybe_compile(forecaster, args)
    if args.init_from is not None:
        print(init_backbone(forecaster, args.init_from, dataset=dataset))
    training = forecaster.config["training"]
    training.update(config_overrides["training"])
    if args.batch_size is not None:
        training["batch_size"] = args.batch_size
    run_name = forecaster.spec.name + ("+stlora" if args.stlora else "")
    out_dir = Path(args.out) if args.out else Path("runs") / f"{run_name}-{data.name}"
    trainer_class, job_args = (Trainer, {}) if job is None else (distributed.DistributedTrainer, {"context": job})
    trainer = trainer_class(forecaster, data, training, device=device, out_dir=out_dir, seed=args.seed,
                            data_source=source, progress=not args.no_progress, verbose=True,
                            max_batches=args.max_batches_per_epoch, precision=args.precision, **job_args)
    trainer.hold_out_dir()  # another run on the same --out is refused, naming this process
    if args.resume:
        if not trainer.resume(allow_unsafe=args.trust_checkpoint):
            raise FileNotFoundError(f"--resume: expected a checkpoint at {out_dir / 'last.pt'}, found none")
        print(f"resumed from {out_dir / 'last.pt'} after epoch {trainer.state.epoch}")
    elif (out_dir / "last.pt").exists():
        print(f"note: {out_dir} holds an earlier run; starting a new one over it (use --resume to continue it)")
    print(f"{model_label(forecaster, device)} on {data.name}: {models.count_parameters(forecaster):,} parameters, "
          f"{data.num_samples('train')} train / {data.num_samples('val')} val / {data.num_samples('test')} test "
          f"samples, batch {training['batch_size']}, device {device}, precision {args.precision}"
          f"{_compile_note(args)}")
    _print_shortened_run(args.max_batches_per_epoch)
    epochs = training["max_epochs"] if args.epochs is None else args.epochs
    guard = BackboneGuard(backbone_of(forecaster)) if args.freeze_backbone else None
    state = trainer.fit(epochs)
    if trainer.trainable:
        print(f"stopped after epoch {state.epoch}; best val loss {state.best_val_loss:.4f} at epoch {state.best_epoch}")
        trainer.load_best()
    if guard is not None:
        print(guard.check())
    results = trainer.evaluate("test")
    _print_metrics(results, f"test metrics ({forecaster.spec.name}, {data.name}):")
    path = trainer.write_metrics(results)
    print(f"wrote {path}")
    return 0


def _print_shortened_run(max_batches: int | None) -> None:
    if max_batches is not None:
        print(f"note: at most {max_batches} batch(es) per split and epoch (--max-batches-per-epoch): a shortened "
              "run, its metrics are not comparable with published ones")


def cmd_eval(args) -> int:
    from .training.checkpoint import check_keys, load_weights
    from .training.trainer import Trainer, load_checkpoint

    device = resolve_device(args.device)
    _positive("--batch-size", args.batch_size)
    _positive("--max-batches", args.max_batches)
    _check_output_file("--json", args.json)
    checkpoint = load_checkpoint(args.checkpoint, allow_unsafe=args.trust_checkpoint)
    check_keys(checkpoint, ("model_name", "dataset", "model_args", "model", "training", "backend"), args.checkpoint,
               "evaluate it")
    backend = args.backend or checkpoint["backend"]
    check_backend(checkpoint["model_name"], backend, device, stlora=checkpoint.get("stlora") is not None)
    source = checkpoint.get("data_source") if args.data is None and not args.synthetic else _data_source(args)
    if source is None:
        raise ValueError("--data PATH or --synthetic: the checkpoint does not say which data it was trained on")
    data = _load_data(checkpoint["dataset"], source)
    context = models.build_context(checkpoint["model_name"], checkpoint["dataset"], data=data)
    forecaster = models.create(checkpoint["model_name"], checkpoint["dataset"], backend=backend, context=context,
                               **checkpoint["model_args"])
    if checkpoint.get("stlora") is not None:
        from .nn.stlora import wrap_forecaster

        forecaster = wrap_forecaster(forecaster, **checkpoint["stlora"])
    load_weights(forecaster.model, checkpoint["model"], args.checkpoint)
    training = dict(checkpoint["training"])
    if args.batch_size is not None:
        training["batch_size"] = args.batch_size
    trainer = Trainer(forecaster, data, training, device=device, progress=False, max_batches=args.max_batches)
    if args.max_batches is not None:
        print(f"note: the first {trainer.num_batches(args.split)} {args.split} batch(es) only (--max-batches)")
    results = trainer.evaluate(args.split)
    _print_metrics(results, f"{args.split} metrics ({model_label(forecaster, device)}, {data.name}, "
                            f"{args.checkpoint}):")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _check_profile_args(args) -> tuple[torch.device, str]:
    device = resolve_device(args.device)
    _positive("--batch-size", args.batch_size)
    _positive("--repeats", args.repeats)
    _positive("--epoch-batches", args.epoch_batches)
    if args.warmup < 0:
        raise ValueError(f"--warmup: expected a non-negative integer, got {args.warmup}")
    _check_stlora_flags(args)
    dataset = _check_model_and_dataset(args.model, args.dataset)
    check_backend(args.model, args.backend, device, stlora=args.stlora)
    _check_numerics_flags(args, device)
    _check_output_file("--json", args.json)
    if args.graph is not None and not Path(args.graph).is_file():
        raise FileNotFoundError(f"--graph: no such file {args.graph}")
    return device, dataset


def cmd_profile(args) -> int:
    from ._progress import ProgressBar
    from .data import synthetic_batch
    from .profiler import profile

    device, dataset = _check_profile_args(args)
    context = models.build_context(args.model, dataset, graph=args.graph, synthetic_seed=args.seed)
    forecaster = _maybe_compile(_maybe_wrap(models.create(args.model, dataset, backend=args.backend,
                                                          context=context), args), args)
    batch, scaler = synthetic_batch(dataset, args.batch_size, seed=args.seed, device=device, return_scaler=True)
    epoch_batches, basis = _epoch_batches(args, dataset)
    print(f"{model_label(forecaster, device)} on {dataset}-shaped synthetic data, batch {args.batch_size} "
          f"(time per epoch: x {epoch_batches:,} training batches, {basis}):", flush=True)
    bar = ProgressBar(args.warmup + args.repeats, "profile", enabled=not args.no_progress)
    report = profile(forecaster, batch, scaler=scaler, warmup=args.warmup, repeats=args.repeats, device=device,
                     on_step=lambda phase: bar.update(1, phase), precision=args.precision,
                     num_train_batches=epoch_batches)
    bar.close()
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


def _epoch_batches(args, dataset: str) -> tuple[int, str]:
    """The training batches an epoch has, and what that count is: ``--epoch-batches`` (the user's data)
    or the dataset's full training split."""
    if args.epoch_batches is not None:
        return args.epoch_batches, "--epoch-batches"
    return configs.dataset_info(dataset).train_batches(args.batch_size), f"the full {dataset} training split"


def _maybe_wrap(forecaster, args):
    """Wrap the forecaster with ST-LoRA when ``--stlora`` was given (options from the --stlora-* flags)."""
    if not args.stlora:
        return forecaster
    from .nn.stlora import wrap_forecaster

    options = {"rank": args.stlora_rank, "num_layers": args.stlora_layers, "adapter": args.stlora_adapter}
    return wrap_forecaster(forecaster, freeze_backbone=args.freeze_backbone, **options)


def _check_numerics_flags(args, device: torch.device) -> None:
    from .training.precision import Precision

    try:
        Precision(args.precision, device)
    except ValueError as error:
        raise ValueError(f"--{error}") from None
    if args.cuda_graphs and device.type != "cuda":
        raise ValueError(f"--cuda-graphs: CUDA graphs need --device cuda, got {device.type}")


def _maybe_compile(forecaster, args):
    """``torch.compile`` the model for --compile (inductor) or --cuda-graphs (mode "reduce-overhead")."""
    if args.compile or args.cuda_graphs:
        forecaster.compile(mode="reduce-overhead" if args.cuda_graphs else None)
    return forecaster


def _compile_note(args) -> str:
    if args.cuda_graphs:
        return ", torch.compile with CUDA graphs"
    return ", torch.compile" if args.compile else ""


# ----------------------------------------------------------------------------------- parsers


def _backend_help() -> str:
    from .ops.backends import BACKENDS

    return ("'reference': the published implementation (every model); for models built on stfast's ops "
            f"(himnet, agcrn) also auto, {', '.join(BACKENDS)}. Default: the model's fastest. A backend this "
            "machine cannot run is refused before anything loads")


def _add_model_flags(parser, *, required: bool) -> None:
    default = {} if required else {"default": "himnet"}
    parser.add_argument("--model", required=required, **default,
                        help=f"one of {', '.join(models.available())}" + ("" if required else " (default: himnet)"))
    default = {} if required else {"default": "METR-LA"}
    parser.add_argument("--dataset", required=required, **default,
                        help=f"one of {', '.join(sorted(configs.DATASETS))} (every model has a configuration for "
                             "each; see `stfast profile`'s header for whether it is published)")
    parser.add_argument("--backend", help=_backend_help())


def _add_stlora_flags(parser) -> None:
    parser.add_argument("--stlora", action="store_true", help="wrap the model with ST-LoRA node-specific predictors")
    parser.add_argument("--stlora-rank", type=int, default=16, help="rank of the per-node adapters (paper: 16)")
    parser.add_argument("--stlora-layers", type=int, default=4, help="NALL layers per predictor (paper: 4)")
    parser.add_argument("--stlora-adapter", default="per_node", choices=["per_node", "shared"],
                        help="per_node: A (N, d, r), B (N, r, d) per node, the paper's form (default); shared: A, B "
                             "shared, a per-node scale (N, r) of the rank space (far fewer parameters)")
    parser.add_argument("--freeze-backbone", action="store_true", help="with --stlora: train only the adapters")


def _add_numerics_flags(parser) -> None:
    parser.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16", "fp16"],
                        help="fp32 (default); tf32: fp32 tensors, matmuls on TF32 tensor cores (CUDA); bf16 / fp16: "
                             "torch.autocast, fp32 weights and accumulation (fp16 with a gradient scaler)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (inductor): a one-off compile of tens of seconds to minutes "
                             "(more on a CPU), repaid on long runs where launch overhead dominates")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="as --compile, plus CUDA graphs (mode 'reduce-overhead'): one launch per step "
                             "instead of hundreds (CUDA only; most useful at small batches)")


def _add_data_flags(parser) -> None:
    parser.add_argument("--data", type=Path, help="a data file or folder (data.npz + index.npz, PEMSxx.npz, "
                                                  ".npy/.npz array, METR-LA/PEMS-BAY .h5, a BasicTS "
                                                  "1.x/0.x or PyTorch Geometric Temporal folder)")
    parser.add_argument("--synthetic", action="store_true", help="synthetic data with the dataset's exact shape")
    parser.add_argument("--num-steps", type=int, help="length of the synthetic series (default: the real length)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic series")
    parser.add_argument("--graph", type=Path, help="graph file (adj_mx.pkl or distance .csv), for models that use one")


def _add_train_parser(sub) -> None:
    train = sub.add_parser("train", help="train a model with its published recipe and report test metrics",
                           description="Train with the model's published recipe, write last.pt / best.pt / "
                                       "metrics.json to --out, and print the test metrics.")
    _add_model_flags(train, required=True)
    _add_data_flags(train)
    train.add_argument("--epochs", type=int, help="total epochs, at least 1 (default: the published maximum)")
    train.add_argument("--max-batches-per-epoch", type=int, metavar="N",
                       help="at most N batches per split and epoch (train, validation, test): a quick first run")
    train.add_argument("--batch-size", type=int, help="default: the published batch size")
    train.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)
    train.add_argument("--seed", type=int, default=0, help="seed of the initial weights, shuffling and dropout "
                                                           "(default: 0)")
    train.add_argument("--out", help="output folder (default: runs/<model>-<dataset>)")
    train.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a configuration entry, e.g. --set training.lr=5e-4 --set model.hidden_dim=32 "
                            "(JSON values; repeatable; saved in <out>/run_config.json)")
    _add_trust_flag(train)
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_numerics_flags(train)
    _add_stlora_flags(train)
    train.add_argument("--init-from", type=Path, metavar="PATH",
                       help="start the backbone from these weights: an stfast checkpoint (best.pt) or a plain state "
                            "dict of the same model and dataset (with --stlora --freeze-backbone: the paper's "
                            "fine-tuning)")
    train.set_defaults(func=cmd_train)


def _add_trust_flag(parser) -> None:
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="also read checkpoints of format version 1 (stfast before checkpoint version 2), "
                             "which need Python's full unpickler: it runs any code the file carries, so use it "
                             "only for files you wrote yourself")


def _add_eval_parser(sub) -> None:
    evaluate = sub.add_parser("eval", help="evaluate a checkpoint: MAE/RMSE/MAPE at horizons 3, 6, 12")
    evaluate.add_argument("--checkpoint", required=True, type=Path,
                          help="a best.pt or last.pt written by `stfast train` (model, dataset and data source "
                               "are read from it)")
    _add_data_flags(evaluate)
    evaluate.add_argument("--split", default="test", choices=["train", "val", "test"],
                          help="which split of the data to evaluate (default: test)")
    evaluate.add_argument("--backend", help="default: the backend the checkpoint was trained with")
    evaluate.add_argument("--batch-size", type=int, help="default: the batch size the checkpoint was trained with")
    evaluate.add_argument("--max-batches", type=int, metavar="N", help="evaluate only the split's first N batches")
    evaluate.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)
    evaluate.add_argument("--json", help="also write the metrics to this JSON file")
    _add_trust_flag(evaluate)
    evaluate.set_defaults(func=cmd_eval)


def _add_profile_parser(sub) -> None:
    prof = sub.add_parser("profile", help="time and memory of one training batch",
                          description="Time warm-up + repeats training steps of one synthetic batch and report "
                                      "parameters, time per batch and epoch, and peak memory.")
    _add_model_flags(prof, required=False)
    prof.add_argument("--batch-size", type=int, default=16, help="default: 16 (the efficiency table's)")
    prof.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)
    prof.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    prof.add_argument("--repeats", type=int, default=10, help="timed steps (default: 10)")
    prof.add_argument("--epoch-batches", type=int, metavar="N",
                      help="training batches per epoch for the epoch time, e.g. those of your data (default: the "
                           "dataset's full training split at --batch-size)")
    prof.add_argument("--seed", type=int, default=0, help="seed of the weights and the synthetic batch (default: 0)")
    prof.add_argument("--graph", type=Path, help="road graph for models that use one (default: the synthetic "
                                                 "data's graph)")
    prof.add_argument("--json", help="write the report to this JSON file")
    prof.add_argument("--no-progress", action="store_true", help="no progress line")
    _add_numerics_flags(prof)
    _add_stlora_flags(prof)
    prof.set_defaults(func=cmd_profile)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stfast", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(sub)
    _add_eval_parser(sub)
    _add_profile_parser(sub)
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
