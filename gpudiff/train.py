"""The training loop behind ``gpudiff train``, importable on its own.

>>> import tempfile
>>> from gpudiff.train import TrainConfig, train
>>> cfg = TrainConfig(epochs=1, limit=256, out=tempfile.mkdtemp(), progress=False)
>>> result = train(cfg, log=lambda line: None)      # log=print shows the epoch lines
>>> len(result["history"]), 0.0 <= result["final_test_acc"] <= 1.0
(1, True)

One run writes into ``config.out``:
  checkpoint     gpudiff.save of model, optimizer, scheduler, epoch, RNG states and history
  metrics.json   the config, the device and one record per epoch (loss, accuracy, lr, time)
  metrics.csv    the per-epoch records as a table
  curves.png     loss and accuracy per epoch (train and test)

Reproducibility: the seed fixes the initial weights (gpudiff's global RNG), the data order
(a separate numpy Generator that drives the DataLoader's shuffling) and dropout (gpudiff's
global RNG again). The checkpoint holds both RNG states, so ``resume=True`` continues exactly
where the run stopped, even inside an epoch (after Ctrl-C): a run stopped and resumed gives
the same numbers as one that was never stopped.

Ctrl-C: the first one finishes the current step, saves a checkpoint and returns with
``result["interrupted"] = True``; a second one stops at once (the checkpoint of the last
finished epoch stays on disk).

Every file is written atomically (a temporary file in the same folder, fsync, os.replace): a
crash or ``kill -9`` at any moment leaves the previous complete file.

Several ranks (``gpudiff train --nproc N`` or ``mpiexec -n N gpudiff train``): see _World.
Rank 0 alone prints and writes; the checkpoint is the plain model's, so a run resumes with
any number of ranks.
"""
import csv
import dataclasses
import io
import json
import math
import os
import signal
import threading
import time

import numpy as np

import gpudiff

from . import models as _models
from .utils.data import Dataset
from .utils.runs import cpu_model, default_out_dir

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "step", "cosine")
DEVICES = ("auto", "cpu", "cuda")

# default learning rate per optimizer (Adam's family wants a much smaller step than SGD)
DEFAULT_LR = {"sgd": 0.1, "adam": 0.001, "adamw": 0.001}

CHECKPOINT = "checkpoint"

# the settings a resumed run must share with the run that wrote the checkpoint: anything
# else (epochs, device, data_dir, progress) may differ
_RESUME_KEYS = ("model", "dataset", "batch_size", "lr", "optimizer", "momentum",
                "weight_decay", "augment", "scheduler", "step_size", "gamma", "seed", "limit",
                "amp")
AMP_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}   # --amp: autocast's dtype


class ConfigError(ValueError):
    """A bad setting or missing input, reported to the user as one line (exit status 2)."""


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a run; the CLI's options map one to one onto these fields."""
    # the defaults: ResNet-8 with SGD reaches ~96-97% on the Digits test set in 10 epochs
    model: str = "resnet-small"
    dataset: str = "digits"
    data_dir: str = None
    epochs: int = 10
    batch_size: int = 64
    lr: float = None              # None: DEFAULT_LR[optimizer]
    optimizer: str = "sgd"
    momentum: float = 0.9         # SGD only
    weight_decay: float = None    # None: 5e-4 for SGD, 0.01 for AdamW, 0 for Adam
    augment: bool = True          # random shifts (and flips for CIFAR-10) of training images
    scheduler: str = "step"       # StepLR / CosineAnnealingLR stepped once per epoch
    step_size: int = 4            # StepLR: multiply the lr by gamma every step_size epochs
    gamma: float = 0.25
    device: str = "auto"
    seed: int = 0
    out: str = None               # None: runs/<timestamp>
    resume: bool = False
    limit: int = None             # use only the first N training (and test) samples
    progress: bool = None         # tqdm bars; None: only when stderr is a terminal
    profile: int = None           # profile N training steps (profile.txt, trace.json in out)
    graph: bool = False           # capture the training step once, replay it (docs/GRAPHS.md)
    amp: str = None               # mixed precision: 'fp16' (autocast + GradScaler) or 'bf16'

    def resolved(self):
        """A copy with the None defaults that depend on other fields filled in."""
        c = dataclasses.replace(self)
        if c.lr is None:
            c.lr = DEFAULT_LR.get(c.optimizer, 0.01)
        if c.weight_decay is None:
            c.weight_decay = {"sgd": 5e-4, "adamw": 0.01}.get(c.optimizer, 0.0)
        return c


# ---- checking the settings ---------------------------------------------------------------
def check_config(c):
    """Raise ConfigError (one readable line) for settings that cannot run."""
    def choose(name, value, options):
        if value not in options:
            raise ConfigError(f"--{name.replace('_', '-')}: unknown value {value!r} "
                              f"(choose from {', '.join(options)})")
    choose("model", c.model, tuple(_models.MODELS))
    choose("dataset", c.dataset, DATASETS)
    choose("optimizer", c.optimizer, OPTIMIZERS)
    choose("scheduler", c.scheduler, SCHEDULERS)
    if c.amp is not None:
        choose("amp", c.amp, tuple(AMP_DTYPES))
    for name in ("epochs", "batch_size", "step_size"):
        v = getattr(c, name)
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: expected a positive integer, got {v!r}")
    if c.limit is not None and (not isinstance(c.limit, (int, np.integer)) or c.limit < 1):
        raise ConfigError(f"--limit: expected a positive integer, got {c.limit!r}")
    if c.profile is not None and (not isinstance(c.profile, (int, np.integer)) or c.profile < 1):
        raise ConfigError(f"--profile: expected a positive integer, got {c.profile!r}")
    if c.lr is not None and not (math.isfinite(c.lr) and c.lr > 0):
        raise ConfigError(f"--lr: expected a positive number, got {c.lr!r}")
    if c.weight_decay is not None and not (math.isfinite(c.weight_decay) and c.weight_decay >= 0):
        raise ConfigError(f"--weight-decay: expected a number >= 0, got {c.weight_decay!r}")
    if not (0 <= c.momentum < 1):
        raise ConfigError(f"--momentum: expected a number in [0, 1), got {c.momentum!r}")
    if not (0 < c.gamma <= 1):
        raise ConfigError(f"--gamma: expected a number in (0, 1], got {c.gamma!r}")
    if c.dataset != "digits" and c.data_dir is None:
        raise ConfigError(f"--dataset {c.dataset} needs --data-dir DIR holding its files "
                          f"(gpudiff never downloads; digits ships with the package)")
    if c.data_dir is not None and not os.path.isdir(c.data_dir):
        raise ConfigError(f"--data-dir {c.data_dir}: no such directory")
    if c.resume and c.out is None:
        raise ConfigError("--resume needs --out DIR, the run directory that holds the checkpoint")
    resolve_device(c.device)   # raises ConfigError when CUDA is asked for but absent


def resolve_device(spec):
    """'auto' -> cuda when a real GPU is there (never the emulator), else cpu."""
    if spec == "auto":
        if gpudiff.cuda.is_available() and not gpudiff.cuda.is_emulated():
            return gpudiff.device("cuda")
        return gpudiff.device("cpu")
    typ = spec.partition(":")[0]
    if typ not in ("cpu", "cuda"):
        raise ConfigError(f"--device: unknown device {spec!r} (choose from auto, cpu, cuda)")
    if typ == "cuda" and not gpudiff.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available here (no NVIDIA GPU or no "
                          "CuPy: pip install gpudiff[cuda]); use --device cpu, or set "
                          "GPUDIFF_CUDA=emulate to run the CUDA code path on the CPU emulator")
    try:
        return gpudiff.device(spec)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"--device {spec}: {e}") from None


def describe_device(dev):
    """One phrase naming the device, saying "emulated" for the CUDA emulator."""
    if dev.type == "cpu":
        return f"cpu ({cpu_model()}, {os.cpu_count()} threads)"
    if dev.emulated:
        return f"{dev.type}:{dev.index or 0} (emulated: CUDA kernels on the CPU emulator, " \
               f"not GPU speed)"
    return f"{dev.type}:{dev.index or 0} ({gpudiff.cuda.get_device_name(dev.index or 0)})"


# ---- data ----------------------------------------------------------------------------------
class _BatchDataset(Dataset):
    """Images and labels held as whole arrays; item ``[i0, i1, ...]`` is a whole batch.

    Used with a BatchSampler as the DataLoader's sampler (and batch_size=None), so one batch
    is one fancy-index into the arrays rather than B tiny tensors stacked again.
    ``augment(images, rng)``, when given, transforms each batch with random numbers from
    ``rng`` (the shuffle generator: its state is in the checkpoint, so a resumed run draws
    the same shifts).
    """

    def __init__(self, images, labels, augment=None, rng=None):
        self.images = images        # (N, C, H, W) float32, normalised
        self.labels = labels        # (N,) int64
        self.augment = augment
        self.rng = rng

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, indices):
        idx = np.asarray(indices, dtype=np.int64)
        x = self.images[idx]
        if self.augment is not None:
            x = self.augment(x, self.rng)
        return x, self.labels[idx]


class RandomShift:
    """Translate each image by up to ``pad`` pixels in x and y (a random crop of the image
    padded with ``fill``), and mirror it left-right with probability 1/2 if ``flip``.

    images: (B, C, H, W) -> (B, C, H, W); fill: (1, C, 1, 1), the value of a black pixel.
    """

    def __init__(self, pad, fill, flip=False):
        self.pad, self.fill, self.flip = int(pad), fill, flip

    def __call__(self, images, rng):
        b, c, h, w = images.shape
        p = self.pad
        padded = np.empty((b, c, h + 2 * p, w + 2 * p), images.dtype)   # (B, C, H+2p, W+2p)
        padded[...] = self.fill
        padded[:, :, p:p + h, p:p + w] = images
        dy = rng.integers(0, 2 * p + 1, b)                               # (B,) crop offsets
        dx = rng.integers(0, 2 * p + 1, b)
        rows = np.arange(h)[None, :] + dy[:, None]                        # (B, H)
        cols = np.arange(w)[None, :] + dx[:, None]                        # (B, W)
        if self.flip:
            mirror = rng.random(b) < 0.5
            cols = np.where(mirror[:, None], cols[:, ::-1], cols)
        return padded[np.arange(b)[:, None, None, None], np.arange(c)[None, :, None, None],
                      rows[:, None, :, None], cols[:, None, None, :]]


def _to_arrays(ds):
    """A gpudiff vision dataset -> (float32 images (N, C, H, W) in [0, 1], int64 labels (N,))."""
    image = getattr(ds, "_image", None)
    if image is not None:   # the raw numpy image: no per-item tensor
        images = np.stack([image(i) for i in range(len(ds))])
    else:
        images = np.stack([ds[i][0].numpy() for i in range(len(ds))])
    if images.ndim == 3:
        images = images[:, None]
    labels = np.asarray(ds.targets if hasattr(ds, "targets") else [ds[i][1] for i in
                                                                   range(len(ds))])
    return images.astype(np.float32, copy=False), labels.astype(np.int64)


def _open_dataset(name, data_dir, train):
    import gpudiff.datasets as D
    if name == "digits":
        return D.Digits(train=train)
    cls = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10"}[name]
    try:
        return getattr(D, cls)(data_dir, train=train)
    except (OSError, RuntimeError, ValueError) as e:   # files missing or damaged
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"--dataset {name} --data-dir {data_dir}: {msg}") from None


def load_data(name, data_dir=None, limit=None, augment=False, rng=None):
    """(train, test) _BatchDatasets, normalised by the training set's per-channel mean/std.

    augment: random shifts of up to 1/8 of the image size (1 pixel for 8x8 digits, 3 for
    MNIST, 4 for CIFAR-10, whose images are also mirrored) on the training batches, drawn
    from ``rng``.
    Returns (train, test, info) where info = dict(in_channels, image_size, num_classes, ...).
    """
    xs = {}
    for split, is_train in (("train", True), ("test", False)):
        x, y = _to_arrays(_open_dataset(name, data_dir, is_train))
        if limit is not None:
            x, y = x[:limit], y[:limit]
        xs[split] = (x, y)
    xtr = xs["train"][0]
    # per-channel statistics of the (limited) training images: (1, C, 1, 1)
    mean = xtr.mean(axis=(0, 2, 3), keepdims=True, dtype=np.float64).astype(np.float32)
    std = xtr.std(axis=(0, 2, 3), keepdims=True, dtype=np.float64).astype(np.float32) + 1e-6
    aug = None
    if augment:
        aug = RandomShift(max(1, xtr.shape[2] // 8), (0.0 - mean) / std,
                          flip=(name == "cifar10"))
    train = _BatchDataset((xs["train"][0] - mean) / std, xs["train"][1], aug, rng)
    test = _BatchDataset((xs["test"][0] - mean) / std, xs["test"][1])
    # ten classes in all four data sets (more only if the labels say so)
    num_classes = max(10, int(max(train.labels.max(), test.labels.max())) + 1)
    info = {"in_channels": int(xtr.shape[1]), "image_size": int(xtr.shape[2]),
            "num_classes": num_classes, "n_train": len(train), "n_test": len(test)}
    return train, test, info


def make_loader(ds, batch_size, shuffle, generator=None):
    """A DataLoader yielding (images, labels) batches; shuffles with ``generator``."""
    from gpudiff.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler
    sampler = RandomSampler(ds, generator=generator) if shuffle else SequentialSampler(ds)
    return DataLoader(ds, batch_size=None, generator=generator,
                      sampler=BatchSampler(sampler, batch_size, drop_last=False))


# ---- model, optimizer, scheduler -----------------------------------------------------------
def make_optimizer(c, params):
    from gpudiff import optim
    if c.optimizer == "sgd":
        return optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
    if c.optimizer == "adam":
        return optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)
    return optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)


def make_scheduler(c, opt):
    if c.scheduler == "none":
        return None
    from gpudiff.optim import lr_scheduler
    if c.scheduler == "step":
        return lr_scheduler.StepLR(opt, step_size=c.step_size, gamma=c.gamma)
    if c.scheduler == "cosine":
        # annealed over the first run's --epochs (its T_max is restored on --resume)
        return lr_scheduler.CosineAnnealingLR(opt, T_max=c.epochs)
    raise ConfigError(f"--scheduler: unknown value {c.scheduler!r}")


def count_parameters(model):
    return sum(int(np.prod(p.shape)) for p in model.parameters())


# ---- outputs ------------------------------------------------------------------------------
_FIELDS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "time_s",
           "samples_per_s")


def _write_atomic(path, data):
    """Write ``data`` (bytes) to ``path`` so that a crash or ``kill -9`` at any moment leaves
    either the previous complete file or the new one: a temporary file in the same folder,
    fsync, os.replace (serialization's writer, which gpudiff.save uses too)."""
    from .serialization import _atomic_write
    _atomic_write(path, data)


def write_metrics(out, summary):
    """metrics.json and metrics.csv in ``out``, each written atomically."""
    _write_atomic(os.path.join(out, "metrics.json"),
                  (json.dumps(summary, indent=2) + "\n").encode())
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=_FIELDS, extrasaction="ignore")
    w.writeheader()
    for row in summary["epochs"]:
        w.writerow(row)
    _write_atomic(os.path.join(out, "metrics.csv"), buf.getvalue().encode())


def plot_curves(path, history, title=""):
    """Loss and accuracy per epoch, train and test, as a PNG (matplotlib's Agg canvas, so no
    display and no change to the caller's matplotlib backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ep = [h["epoch"] for h in history]
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    ax1.plot(ep, [h["test_loss"] for h in history], "s-", label="test")
    ax1.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax2.plot(ep, [100 * h["train_acc"] for h in history], "o-", label="train")
    ax2.plot(ep, [100 * h["test_acc"] for h in history], "s-", label="test")
    ax2.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    _write_atomic(path, png.getvalue())     # a kill mid-write keeps the previous curves.png


# ---- Ctrl-C ---------------------------------------------------------------------------------
class _InterruptFlag:
    """While active, the first SIGINT only sets ``self.set`` (the loop saves and stops at the
    next step boundary); a second one raises KeyboardInterrupt as usual."""

    def __init__(self):
        self.set = False
        self._old = None

    def _handler(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


# ---- the run ------------------------------------------------------------------------------
def _save(path, obj):
    save = getattr(gpudiff, "save", None)
    if save is None:
        from .serialization import save
    save(obj, path)


def _load(path, map_location=None):
    load = getattr(gpudiff, "load", None)
    if load is None:
        from .serialization import load
    return load(path, map_location=map_location)


def _plain(value):
    """numpy scalars -> Python numbers (for JSON)."""
    return value.item() if isinstance(value, np.generic) else value


# ---- several ranks (gpudiff train --nproc N, or mpiexec -n N gpudiff train) -------------------
class _World:
    """This process's place in the job: rank 0 of 1 without a launcher.

    With N ranks every global batch is split into N contiguous slices (rank r takes
    [B*r//N, B*(r+1)//N)), BatchNorm becomes SyncBatchNorm and the model is wrapped in
    DistributedDataParallel, so N ranks compute the same step as one process on the whole
    batch: the data order, the checkpoint and the numbers do not depend on N, and a run
    resumes with any number of ranks.
    """

    def __init__(self):
        from .distributed import launch
        self.dist = None
        self.rank, self.size = 0, 1
        if launch.under_mpi_launcher() and (launch.launcher_world_size() or 1) > 1 or \
                _dist_initialized():
            from . import distributed as dist
            if not dist.is_initialized():
                dist.init_process_group("gloo")
            self.dist = dist
            self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.main = self.rank == 0

    def agree(self, fn):
        """Run ``fn()`` on every rank; a ConfigError on any rank is raised on all of them
        (so no rank goes on to wait for the others in a collective)."""
        err = None
        try:
            result = fn()
        except ConfigError as e:
            err, result = str(e), None
        if self.dist is not None:
            errs = [None] * self.size
            self.dist.all_gather_object(errs, err)
            err = next((e for e in errs if e is not None), None)
        if err is not None:
            raise ConfigError(err)
        return result

    def from_rank0(self, value):
        if self.dist is None:
            return value
        box = [value]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def local(self, b):
        """This rank's slice of a global batch of ``b`` samples."""
        return slice(b * self.rank // self.size, b * (self.rank + 1) // self.size)

    def sum(self, values):
        """Element-wise sum of a list of numbers over all ranks."""
        if self.dist is None:
            return list(values)
        t = gpudiff.tensor(np.asarray(values, dtype=np.float64))
        self.dist.all_reduce(t)
        return t.tolist()

    def any(self, flag):
        return bool(self.sum([float(flag)])[0]) if self.dist is not None else bool(flag)


def _dist_initialized():
    import sys
    d = sys.modules.get("gpudiff.distributed")
    return d is not None and d.is_initialized()


class CapturedStep:
    """``--graph``: the training step (forward, loss, backward, optimizer step) captured once
    into a ``gpudiff.Graph`` (``gpudiff.cuda.CUDAGraph`` on cuda) on static input tensors, and
    replayed for every batch of the captured size (docs/GRAPHS.md). The caller runs warm-up
    steps eagerly first; a batch of another size (the last one) runs eagerly too."""

    def __init__(self, net, opt, x, y, amp_dtype=None):
        import gpudiff
        from .nn import functional as F
        dev = x.device
        self.x = gpudiff.zeros(x.shape, dtype=x.dtype, device=dev)
        self.y = gpudiff.zeros(y.shape, dtype=y.dtype, device=dev)
        self.x.copy_(x)
        self.y.copy_(y)
        self.graph = gpudiff.cuda.CUDAGraph() if dev.type == "cuda" else gpudiff.Graph()
        ctx = gpudiff.cuda.graph if dev.type == "cuda" else gpudiff.graph
        opt.zero_grad(set_to_none=True)
        with ctx(self.graph):
            with gpudiff.autocast(dev.type, amp_dtype, enabled=amp_dtype is not None):
                self.out = net(self.x)                              # (B, classes) logits
                self.loss = F.cross_entropy(self.out, self.y)
            self.loss.backward()
            opt.step()

    def __call__(self, x, y):
        """One training step on (x, y): (loss, logits), the graph's static tensors."""
        self.x.copy_(x)
        self.y.copy_(y)
        self.graph.replay()
        return self.loss, self.out


_GRAPH_WARMUP = 2  # eager steps before the capture (lazily made optimizer state exists then)


@gpudiff.no_grad()
def evaluate(model, loader, device, world=None):
    """(mean cross-entropy, accuracy) of ``model`` over ``loader`` (with several ranks: each
    evaluates its slice of every batch and the sums are all-reduced)."""
    from .nn import functional as F
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for x, y in loader:
        if world is not None and world.size > 1:
            part = world.local(y.shape[0])
            x, y = x[part], y[part]
            if y.shape[0] == 0:
                continue
        x, y = x.to(device), y.to(device)
        out = model(x)                                              # (B, classes)
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        seen += y.shape[0]
    if world is not None:
        loss_sum, correct, seen = world.sum([loss_sum, correct, seen])
    return loss_sum / max(seen, 1), correct / max(seen, 1)


def train(config, log=print, on_step=None, given=None):
    """Train as ``config`` says; returns a dict with the history and the output paths.

    log: called with each line of output (the header, one line per epoch, the summary).
    on_step: optional callback ``on_step(epoch, step)`` after every optimizer step (tests use
    it to simulate Ctrl-C).
    given: the names of the settings the user gave explicitly (the CLI passes them). On
    resume those must agree with the checkpoint's, and the others come from it; None means
    "the ones that differ from TrainConfig's defaults".
    Raises ConfigError for settings that cannot run (the CLI prints it as one line).
    """
    from tqdm.auto import tqdm

    from .nn import functional as F

    world = _World()
    if not world.main:           # rank 0 alone prints and writes files
        def log(line=""):
            pass
    requested = config
    # every rank uses rank 0's output folder (the default one is named by the clock)
    out = world.from_rank0(requested.out or default_out_dir())
    ckpt_path = os.path.join(out, CHECKPOINT)

    def setup():
        check_config(requested)
        state = None
        if requested.resume:   # every rank reads the checkpoint (several nodes: a shared --out)
            if not os.path.isfile(ckpt_path):
                raise ConfigError(f"--resume: no checkpoint in {out} (expected {ckpt_path})")
            try:
                state = _load(ckpt_path)
            except (OSError, ValueError) as e:
                raise ConfigError(f"--resume: cannot read {ckpt_path}: "
                                  f"{str(e).splitlines()[0]}") from None
            c = _merge_resume(requested, state["config"], given)
        else:
            if os.path.exists(ckpt_path):
                raise ConfigError(f"--out {out} already holds a checkpoint; add --resume to "
                                  f"continue it, or choose another --out")
            c = requested.resolved()
        c.out = out
        device = resolve_device(c.device)
        if world.size > 1 and device.type == "cuda" and not device.emulated:
            local = int(os.environ.get("LOCAL_RANK", world.rank))   # one GPU per rank
            device = gpudiff.device("cuda", local % gpudiff.cuda.device_count())
        return state, c, device

    state, c, device = world.agree(setup)

    # -- build everything from the seed (a resume then overwrites it from the checkpoint)
    gpudiff.manual_seed(c.seed)
    # the data order and the augmentation have their own generator, so that its state can be
    # saved and restored
    shuffle_gen = np.random.default_rng(np.random.SeedSequence([c.seed, 1]))
    train_ds, test_ds, info = load_data(c.dataset, c.data_dir, c.limit, c.augment, shuffle_gen)
    model = _models.create_model(c.model, info["in_channels"], info["image_size"],
                                 info["num_classes"]).to(device)
    opt = make_optimizer(c, model.parameters())
    sched = make_scheduler(c, opt)
    # --amp: autocast around the forward; float16 also scales the loss (GradScaler)
    amp_dtype = getattr(gpudiff, AMP_DTYPES[c.amp]) if c.amp else None
    scaler = gpudiff.amp.GradScaler(device.type, enabled=c.amp == "fp16")
    train_loader = make_loader(train_ds, c.batch_size, True, shuffle_gen)
    test_loader = make_loader(test_ds, 1000, False)
    n_batches = len(train_loader)

    history, start_epoch, skip, partial = [], 0, 0, None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None and state.get("scheduler") is not None:
            sched.load_state_dict(state["scheduler"])
        if scaler.is_enabled() and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history = list(state["history"])
        start_epoch, skip = int(state["epoch"]), int(state["step"])
        partial = state.get("partial")
        shuffle_gen.bit_generator.state = state["rng"]["shuffle"]
        gpudiff.set_rng_state(state["rng"]["gpudiff"])
    net = model         # what the training step calls: DDP(model) with several ranks
    if world.size > 1:
        from .nn import SyncBatchNorm
        from .nn.parallel import DistributedDataParallel
        model = SyncBatchNorm.convert_sync_batchnorm(model)   # same state_dict keys
        # SyncBatchNorm keeps the running statistics equal on every rank: no buffer broadcasts
        net = DistributedDataParallel(model, broadcast_buffers=False)

    def make_out():
        if world.main:
            try:
                os.makedirs(out, exist_ok=True)
            except OSError as e:     # a file in the way, no permission
                raise ConfigError(f"--out {out}: cannot create the directory "
                                  f"({e.strerror})") from None
    world.agree(make_out)
    n_params = count_parameters(model)
    dev_text = describe_device(device)
    if world.size > 1:
        dev_text += f" x {world.size} ranks (MPI data parallel)"
    summary = {
        "config": dataclasses.asdict(c), "device": dev_text, "model_parameters": n_params,
        "data": info, "gpudiff_version": gpudiff.__version__, "world_size": world.size,
        "epochs": history,
    }
    title = f"{c.model} on {c.dataset} ({dev_text.split(' (')[0]})"

    log(f"gpudiff {gpudiff.__version__} | device: {dev_text}")
    log(f"model {c.model} ({n_params:,} parameters) | dataset {c.dataset}: "
        f"{info['n_train']:,} train / {info['n_test']:,} test images, "
        f"{info['in_channels']}x{info['image_size']}x{info['image_size']}")
    wd = f" weight_decay={c.weight_decay:g}" if c.weight_decay else ""
    sch = {"none": "constant lr", "step": f"StepLR(step_size={c.step_size}, gamma={c.gamma:g})",
           "cosine": f"CosineAnnealingLR(T_max={getattr(sched, 'T_max', c.epochs)})"
           }[c.scheduler]
    aug = " | augment: random shifts" + (", flips" if c.dataset == "cifar10" else "") \
        if c.augment else ""
    per_rank = f" ({c.batch_size // world.size}-{-(-c.batch_size // world.size)} per rank)" \
        if world.size > 1 else ""
    log(f"optimizer {c.optimizer} lr={c.lr:g}{wd}, {sch} | batch {c.batch_size}{per_rank} | "
        f"epochs {c.epochs}{aug} | seed {c.seed} | out {out}"
        + (f" | amp {c.amp} (autocast {amp_dtype}"
           + (", GradScaler)" if scaler.is_enabled() else ")") if c.amp else ""))
    if state is not None:
        where = f"epoch {start_epoch}" + (f", step {skip}/{n_batches}" if skip else "")
        log(f"resumed from {ckpt_path} ({where})")
        if start_epoch >= c.epochs:
            log(f"nothing to do: the checkpoint has already trained {start_epoch} epoch(s) "
                f"(ask for more with --epochs)")

    def checkpoint(epoch, step, epoch_start_rng, part):
        if not world.main:
            return
        _save(ckpt_path, {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": None if sched is None else sched.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch, "step": step, "partial": part,
            "rng": {"gpudiff": gpudiff.get_rng_state(), "shuffle": epoch_start_rng},
            "history": history, "config": dataclasses.asdict(c),
            "gpudiff_version": gpudiff.__version__,
        })

    def finish_outputs():
        if not world.main:
            return
        summary["epochs"] = history
        if history:
            best = max(history, key=lambda h: h["test_acc"])
            summary.update(final_test_acc=history[-1]["test_acc"],
                           best_test_acc=best["test_acc"], best_epoch=best["epoch"])
        write_metrics(out, summary)
        if history:
            plot_curves(os.path.join(out, "curves.png"), history, title)

    progress = c.progress
    interrupted = False
    profiler = None     # --profile N: gpudiff.profiler over N steps after a warm-up step
    if c.profile and world.main:
        from .profiler import TrainingProfile
        profiler = TrainingProfile(out, c.profile, log=log)
    captured, graph_note = None, None     # --graph: the CapturedStep once it is made
    if c.graph and c.amp == "fp16":
        log("--graph: not with --amp fp16 (GradScaler's step reads the inf/NaN flag on the "
            "host, which a captured step cannot); training eagerly")
        graph_note = "eager fallback"
    if c.graph and (world.size > 1 or profiler is not None):
        log("--graph: " + ("not with --nproc > 1 (DDP's all-reduce hooks run per step)"
                           if world.size > 1 else "not with --profile (it times eager ops)")
            + "; training eagerly")
        graph_note = "eager fallback"
    t_run = time.perf_counter()
    with _InterruptFlag() as flag:
        for epoch in range(start_epoch, c.epochs):
            epoch_start_rng = shuffle_gen.bit_generator.state   # a copy (a fresh dict)
            part = {"loss_sum": 0.0, "correct": 0, "seen": 0, "time_s": 0.0}
            if partial:      # the sums over all ranks so far: counted once, on rank 0
                part = dict(partial) if world.main else dict(part, time_s=partial["time_s"])
            partial = None
            lr = opt.param_groups[0]["lr"]
            model.train()
            bar = tqdm(total=info["n_train"], initial=part["seen"], unit="img", unit_scale=False,
                       desc=f"epoch {epoch + 1}/{c.epochs}", leave=False, dynamic_ncols=True,
                       disable=(not world.main) or ((not _stderr_tty()) if progress is None
                                                    else not progress))
            t0 = time.perf_counter() - part["time_s"]
            step = 0
            stop = False
            for step, (x, y) in enumerate(train_loader, 1):
                if step <= skip:   # already done before the interruption (same order)
                    continue
                b = y.shape[0]                                      # the global batch
                weight = 1.0
                if world.size > 1:     # this rank's slice; the loss is scaled so that DDP's
                    mine = world.local(b)   # average of the ranks' gradients is the mean
                    xs, ys = x[mine], y[mine]   # over the whole batch
                    if ys.shape[0] == 0:    # a last batch smaller than the world: a dummy
                        xs, ys, weight = x[:1], y[:1], 0.0  # sample with weight 0
                    x, y = xs, ys
                x, y = x.to(device), y.to(device)
                if c.graph and captured is None and graph_note is None \
                        and step > _GRAPH_WARMUP + skip:
                    try:
                        captured = CapturedStep(net, opt, x, y, amp_dtype)
                        graph_note = "captured"
                        log(f"--graph: training step captured ({captured.graph.num_steps} "
                            f"steps replayed per batch of {x.shape[0]})")
                    except Exception as e:  # noqa: BLE001 (any reason: say it, go on eagerly)
                        graph_note = "eager fallback"
                        log(f"--graph: this model's step cannot be captured "
                            f"({type(e).__name__}: {str(e).splitlines()[0]}); training eagerly")
                if captured is not None and x.shape == captured.x.shape:
                    loss, out_ = captured(x, y)                     # replay: the whole step
                else:
                    with gpudiff.autocast(device.type, amp_dtype, enabled=c.amp is not None):
                        out_ = net(x)                               # (B, classes) logits
                        if world.size > 1:
                            loss_sum = F.cross_entropy(out_, y, reduction="sum")
                            loss = loss_sum * (weight * world.size / b)
                        else:
                            loss = F.cross_entropy(out_, y)
                    opt.zero_grad()
                    if scaler.is_enabled():   # --amp fp16: a step with inf/NaN is skipped
                        scaler.scale(loss).backward()
                        before = scaler.get_scale()
                        scaler.step(opt)
                        scaler.update()
                        part["skipped"] = part.get("skipped", 0) + (scaler.get_scale() < before)
                    else:
                        loss.backward()
                        opt.step()
                if world.size > 1:
                    part["loss_sum"] += loss_sum.item() * weight
                    part["correct"] += (out_.argmax(1) == y).sum().item() * int(weight)
                    part["seen"] += y.shape[0] * int(weight)
                else:
                    part["loss_sum"] += loss.item() * b
                    part["correct"] += (out_.argmax(1) == y).sum().item()
                    part["seen"] += b
                bar.update(b)
                seen = max(part["seen"], 1)
                bar.set_postfix(loss=f"{part['loss_sum'] / seen:.4f}",
                                acc=f"{100 * part['correct'] / seen:.1f}%",
                                refresh=False)
                if on_step is not None:
                    on_step(epoch, step)
                if profiler is not None:
                    profiler.step()
                stop = world.any(flag.set)      # every rank stops after the same step
                if stop:
                    break
            step = max(step, skip)
            skip = 0
            bar.close()
            if profiler is not None:
                profiler.pause()
            if world.size > 1:
                part["loss_sum"], part["correct"], part["seen"] = world.sum(
                    [part["loss_sum"], part["correct"], part["seen"]])
                part["correct"], part["seen"] = int(part["correct"]), int(part["seen"])
            if stop:
                part["time_s"] = time.perf_counter() - t0
                checkpoint(epoch, step, epoch_start_rng, part)
                interrupted = f"epoch {epoch + 1}, step {step}/{n_batches}"
                break
            train_time = time.perf_counter() - t0
            test_loss, test_acc = evaluate(model, test_loader, device, world)
            seen = max(part["seen"], 1)
            history.append({
                "epoch": epoch + 1,
                "train_loss": part["loss_sum"] / seen, "train_acc": part["correct"] / seen,
                "test_loss": test_loss, "test_acc": test_acc, "lr": _plain(lr),
                "time_s": round(train_time, 3),
                "samples_per_s": round(part["seen"] / max(train_time, 1e-9), 1),
            })
            if c.amp:
                history[-1].update(skipped_steps=int(part.get("skipped", 0)),
                                   loss_scale=scaler.get_scale())
            if sched is not None:
                sched.step()
            h = history[-1]
            log(f"epoch {h['epoch']:>{len(str(c.epochs))}}/{c.epochs}  "
                f"train loss {h['train_loss']:.4f} acc {100 * h['train_acc']:5.1f}%  |  "
                f"test loss {h['test_loss']:.4f} acc {100 * h['test_acc']:5.1f}%  |  "
                f"lr {h['lr']:.3g}  {h['time_s']:.1f}s  {h['samples_per_s']:,.0f} img/s"
                + (f"  |  amp fp16: {h['skipped_steps']} skipped step(s), loss scale "
                   f"{h['loss_scale']:g}" if c.amp == "fp16" else
                   "  |  amp bf16" if c.amp else ""))
            checkpoint(epoch + 1, 0, shuffle_gen.bit_generator.state, None)
            finish_outputs()
            if world.any(flag.set):  # Ctrl-C during evaluation: the epoch is complete, saved
                interrupted = f"after epoch {epoch + 1}"
                break
    total = time.perf_counter() - t_run
    summary["time_s"] = round(total, 3)
    if c.graph:
        summary["graph"] = graph_note or "not captured (no batch after the warm-up)"
    if profiler is not None:
        profiler.close()
    finish_outputs()

    result = {"out": out, "checkpoint": ckpt_path, "history": history,
              "interrupted": bool(interrupted), "device": dev_text, "time_s": total,
              "config": dataclasses.asdict(c)}
    if history:
        result.update(final_test_acc=history[-1]["test_acc"],
                      best_test_acc=max(h["test_acc"] for h in history))
    if interrupted:
        log(f"interrupted ({interrupted}): checkpoint saved to {ckpt_path}; continue with "
            f"gpudiff train --out {out} --resume")
    elif history:
        best = max(history, key=lambda h: h["test_acc"])
        log(f"done in {total:.1f}s: test accuracy {100 * history[-1]['test_acc']:.1f}% "
            f"(best {100 * best['test_acc']:.1f}% at epoch {best['epoch']}); wrote "
            f"checkpoint, metrics.json, metrics.csv, curves.png to {out}")
    return result


def _stderr_tty():
    import sys
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _merge_resume(requested, saved, given=None):
    """The saved run's settings, with the new epochs/device/data_dir/progress where given; a
    setting that was given and differs from the saved run is an error (it would not be the
    same run)."""
    saved_cfg = TrainConfig(**{k: v for k, v in saved.items()
                               if k in TrainConfig.__dataclass_fields__})
    if given is None:
        defaults = TrainConfig()
        given = {f for f in TrainConfig.__dataclass_fields__
                 if getattr(requested, f) != getattr(defaults, f)}
        given |= {"epochs", "device", "progress"}   # an API caller always means these
    for key in _RESUME_KEYS:
        new, old = getattr(requested, key), getattr(saved_cfg, key)
        if key in given and new != old:
            opt = "--" + key.replace("_", "-")
            raise ConfigError(f"--resume: {opt} {new} differs from the checkpoint's {old}; "
                              f"leave {opt} out to continue the same run")
    new = {k: getattr(requested, k) for k in ("epochs", "device", "data_dir", "progress",
                                              "profile") if k in given}
    return dataclasses.replace(saved_cfg, resume=True, **{"profile": None, **new})
