"""The ``gpudiff`` command: ``gpudiff train`` and ``gpudiff bench`` (also ``python -m gpudiff``).

Exit status: 0 done, 2 bad arguments (one line on stderr, no traceback), 130 stopped by
Ctrl-C (after saving a checkpoint).
"""
import argparse
import sys

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit status 2)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _positive_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def _train_parser(sub):
    from .models import MODELS
    from .train import DATASETS, DEFAULT_LR, OPTIMIZERS, SCHEDULERS, TrainConfig
    d = TrainConfig()
    p = sub.add_parser(
        "train", help="train a CNN (default: a small ResNet on the bundled Digits set)",
        description="Train a CNN and write checkpoint, metrics.json, metrics.csv and curves.png "
                    "into --out. With no options: a small ResNet (ResNet-8) on the bundled 8x8 "
                    "Digits set, ~97% test accuracy in 10 epochs.",
        argument_default=argparse.SUPPRESS)   # only the options given reach TrainConfig
    p.add_argument("--model", choices=list(MODELS), help=f"network (default {d.model})")
    p.add_argument("--dataset", choices=DATASETS, help=f"data set (default {d.dataset}, which "
                   "ships with gpudiff; the others read their standard files from --data-dir)")
    p.add_argument("--data-dir", metavar="DIR", help="directory holding the data set's files")
    p.add_argument("--epochs", type=_positive_int, metavar="N",
                   help=f"train until this many epochs are done (default {d.epochs})")
    p.add_argument("--batch-size", type=_positive_int, metavar="N",
                   help=f"(default {d.batch_size})")
    p.add_argument("--lr", type=_positive_float, help="learning rate (default " + ", ".join(
        f"{v:g} for {k}" for k, v in DEFAULT_LR.items()) + ")")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help=f"(default {d.optimizer})")
    p.add_argument("--momentum", type=float, help=f"SGD momentum (default {d.momentum:g})")
    p.add_argument("--weight-decay", type=float,
                   help="(default 5e-4 for sgd, 0.01 for adamw, 0 for adam)")
    aug = p.add_mutually_exclusive_group()
    aug.add_argument("--augment", dest="augment", action="store_true",
                     help="random shifts of the training images by up to 1/8 of their size "
                          "(and mirroring for cifar10) (default)")
    aug.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--scheduler", choices=SCHEDULERS,
                   help=f"learning-rate schedule, stepped per epoch (default {d.scheduler})")
    p.add_argument("--step-size", type=_positive_int, metavar="N",
                   help=f"StepLR: decay the lr every N epochs (default {d.step_size})")
    p.add_argument("--gamma", type=float, help=f"StepLR decay factor (default {d.gamma:g})")
    p.add_argument("--device", metavar="{auto,cpu,cuda}",
                   help="auto (default): cuda when a real GPU is present, else cpu; "
                        "cuda[:N] with GPUDIFF_CUDA=emulate runs on the CUDA emulator")
    p.add_argument("--seed", type=int, help=f"random seed (default {d.seed})")
    p.add_argument("--out", metavar="DIR", help="output directory (default runs/<timestamp>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint up to --epochs (with "
                        "any --nproc)")
    p.add_argument("--nproc", type=_positive_int, metavar="N",
                   help="data-parallel ranks started through mpiexec (pip install "
                        "'gpudiff[distributed]'); --batch-size is the global batch, split "
                        "across the ranks; rank 0 prints and writes (default 1)")
    p.add_argument("--profile", type=_positive_int, metavar="N",
                   help="profile N training steps after a warm-up step (gpudiff.profiler) and "
                        "write profile.txt (per-op table) and trace.json (Chrome trace, for "
                        "ui.perfetto.dev) into --out")
    p.add_argument("--limit", type=_positive_int, metavar="N",
                   help="use only the first N training and test images (quick runs, tests)")
    p.add_argument("--graph", action="store_true",
                   help="capture the training step once (gpudiff.Graph; a CUDA graph on cuda) "
                        "after 2 warm-up steps and replay it for every batch (docs/GRAPHS.md); "
                        "a model that cannot be captured trains eagerly, with the reason")
    p.add_argument("--amp", choices=("fp16", "bf16"),
                   help="mixed precision: autocast (convolutions and linear layers in float16 /"
                        " bfloat16, docs/AMP.md); fp16 also scales the loss (GradScaler) and "
                        "skips steps whose gradients overflow (counted per epoch)")
    prog = p.add_mutually_exclusive_group()
    prog.add_argument("--progress", dest="progress", action="store_true",
                      help="always show progress bars (default: when stderr is a terminal)")
    prog.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_cmd_train)
    return p


def _bench_parser(sub):
    p = sub.add_parser(
        "bench", help="time ops and training steps: gpudiff vs PyTorch, CPU vs GPU",
        description="Benchmark gpudiff's ops and training steps and print a table; writes "
                    "bench.json and bench.png into --out.")
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats (< 1 min)")
    p.add_argument("--device", default=None, metavar="LIST",
                   help="comma-separated devices among cpu,cuda (default: cpu, plus cuda "
                        "when a GPU or the emulator is present)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="directory for bench.json and bench.png (default bench-runs/<timestamp>)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    p.add_argument("--repeat", type=_positive_int, default=None, metavar="N",
                   help="timed rounds per case (default 5 quick, 20 full)")
    p.add_argument("--warmup", type=int, default=None, metavar="N",
                   help="untimed rounds first (default 1 quick, 3 full)")
    p.add_argument("--only", default=None, metavar="NAMES",
                   help="comma-separated case-name prefixes, e.g. 'conv2d,lenet'")
    p.add_argument("--profile", action="store_true",
                   help="also print a cProfile of one gpudiff CPU training step per model")
    p.add_argument("--distributed", action="store_true",
                   help="instead: all-reduce bandwidth by message size (vs memcpy) and "
                        "training-step scaling from 1 to --nproc ranks (MPI)")
    p.add_argument("--nproc", type=_positive_int, default=2, metavar="N",
                   help="ranks for --distributed (default 2)")
    p.set_defaults(func=_cmd_bench)
    return p


def build_parser():
    from . import __version__
    p = _Parser(prog="gpudiff", description="gpudiff: a GPU-accelerated, tape-based autodiff "
                "engine for training CNNs, with a PyTorch-style API.")
    p.add_argument("--version", action="version", version=f"gpudiff {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{train,bench}", parser_class=_Parser)
    _train_parser(sub)
    _bench_parser(sub)
    return p


def _error(prog, message):
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _cmd_train(args):
    from .distributed import launch
    from .train import ConfigError, TrainConfig, train
    nproc = getattr(args, "nproc", 1)
    if nproc > 1 and not launch.under_mpi_launcher():
        # start N copies of this same command through mpiexec; each joins as one rank
        try:
            return launch.launch(nproc, [sys.executable, "-m", "gpudiff"] + args.argv)
        except launch.LaunchError as e:
            return _error("gpudiff train", f"--nproc {nproc}: {e}")
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
    size = launch.launcher_world_size() if launch.under_mpi_launcher() else 1
    if "nproc" in vars(args) and size != nproc:
        return _error("gpudiff train", f"--nproc {nproc}, but mpiexec started {size} rank(s)")
    given = {k for k in vars(args) if k in TrainConfig.__dataclass_fields__}
    config = TrainConfig(**{k: getattr(args, k) for k in given})
    try:
        result = train(config, log=_print_flush, given=given)
    except ConfigError as e:
        if _rank() != 0:       # every rank raises it; rank 0 says it
            return EXIT_USAGE
        return _error("gpudiff train", e)
    except KeyboardInterrupt:   # a second Ctrl-C, or one before training started
        print("gpudiff train: interrupted (the last finished epoch's checkpoint, if any, is "
              "kept)", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_INTERRUPTED if result["interrupted"] else 0


def _cmd_bench(args):
    from .benchmark import BenchError, run_cli
    if args.distributed:
        return _cmd_bench_distributed(args)
    try:
        only = None if args.only is None else [n.strip() for n in args.only.split(",")
                                                if n.strip()]
        return run_cli(quick=args.quick, devices=args.device, out=args.out,
                       torch=not args.no_torch, repeat=args.repeat, warmup=args.warmup,
                       only=only, profile=args.profile, log=_print_flush)
    except BenchError as e:
        return _error("gpudiff bench", e)
    except KeyboardInterrupt:
        print("gpudiff bench: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _cmd_bench_distributed(args):
    import json
    import os

    from .benchmark import run_distributed
    from .distributed import launch
    try:
        res = run_distributed(args.nproc, quick=args.quick, log=_print_flush)
    except (launch.LaunchError, RuntimeError) as e:
        return _error("gpudiff bench", f"--distributed: {e}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "bench_distributed.json")
        with open(path, "w") as f:
            json.dump(res, f, indent=2)
        _print_flush(f"wrote {path}")
    return 0


def _rank():
    d = sys.modules.get("gpudiff.distributed")
    return d.get_rank() if d is not None and d.is_initialized() else 0


def _print_flush(line=""):
    # through tqdm, so a progress bar on stderr is not torn by the line
    from tqdm.auto import tqdm
    tqdm.write(str(line), file=sys.stdout)
    sys.stdout.flush()


def main(argv=None):
    """Entry point of the ``gpudiff`` console script; returns the exit status."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
