"""CPU training-step benchmark: gpudiff against PyTorch CPU, in one process, interleaved.

    python bench/bench_cpu.py                  # all models + per-op timings, JSON to bench/results/
    python bench/bench_cpu.py --models mnist --reps 30
    python bench/bench_cpu.py --profile        # also cProfile one gpudiff step per model

A thin wrapper: the cases, the timing and the reports are gpudiff/benchmark.py, the code
behind ``gpudiff bench`` (this is ``gpudiff bench --device cpu`` with the models chosen
here and the JSON written under bench/results/).

Models (batch 64, SGD with momentum 0.9, the same initial weights in both frameworks, from
gpudiff.models, built once on gpudiff.nn and once on torch.nn):
  mnist    PyTorch's MNIST example Net (mnist-cnn): conv 1->32 3x3, relu, conv 32->64 3x3,
           relu, maxpool 2, dropout 0.25, fc 9216->128, relu, dropout 0.5, fc 128->10; 1x28x28
  lenet    LeNet-5 with sigmoid activations and average pooling: conv 1->6 5x5 pad 2,
           sigmoid, avgpool 2, conv 6->16 5x5, sigmoid, avgpool 2, fc 400->120->84->10 with
           sigmoids; 1x28x28
  resnet   CIFAR ResNet-20 (He et al. 2016, section 4.2): conv 3->16, three stages of 3
           basic blocks (16, 32, 64 channels; BatchNorm; 1x1 conv + BN projection where the
           shape changes), global average pool, fc 64->10; 3x32x32
  resnet8  the same with one block per stage (resnet-small, `gpudiff train`'s default)
  tiny-mlp Flatten, Linear 64->8, 6 x (Linear 8->8, Tanh), Linear 8->10 at batch 4: 99 small
           ops a step, so the step time is the frameworks' per-op cost

A step is zero_grad, forward, cross-entropy loss, backward, optimizer step. Each framework
runs in its own worker process (PyTorch's OpenMP threads and ours would otherwise spin against
each other on the same cores); in each round every framework runs one step, the order
alternating, so both see the same machine load. We report the median, the minimum and the
IQR over the rounds and the ratio gpudiff / PyTorch, and check that both frameworks give the
same eval-mode loss from the same weights.
Per-op rows time conv2d and max_pool2d forward and forward+backward at the models' shapes.
"""
import argparse
import datetime
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

from gpudiff import benchmark

# this script's model names -> gpudiff.benchmark's training-step cases
MODELS = {"mnist": "mnist-cnn", "lenet": "lenet", "resnet": "resnet-20",
          "resnet8": "resnet-small", "tiny-mlp": "tiny-mlp"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["mnist", "lenet", "resnet", "tiny-mlp"],
                    choices=list(MODELS))
    ap.add_argument("--reps", type=int, default=20, help="timed steps per framework")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--op-reps", type=int, default=15)
    ap.add_argument("--no-ops", action="store_true", help="skip the per-op timings")
    ap.add_argument("--profile", action="store_true", help="cProfile one gpudiff step")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/cpu_<date>.json)")
    args = ap.parse_args(argv)

    out = args.out or os.path.join(
        HERE, "results", f"cpu_{datetime.datetime.now().strftime('%Y%m%d_%H%M%S')}.json")
    only = [f"{MODELS[m]} train step" for m in args.models]
    if not args.no_ops:
        only += ["conv2d", "max_pool2d"]
    name = os.path.basename(out)
    return benchmark.run_cli(
        quick=False, devices="cpu", out=os.path.dirname(os.path.abspath(out)), only=only,
        repeat=args.reps, op_repeat=args.op_reps, warmup=args.warmup, profile=args.profile,
        json_name=name, png_name=os.path.splitext(name)[0] + ".png",
        source="bench/bench_cpu.py")


if __name__ == "__main__":
    sys.exit(main())
