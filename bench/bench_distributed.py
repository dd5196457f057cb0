"""Distributed benchmark: all-reduce bandwidth by message size vs memcpy, and MNIST-net
training-step scaling 1 -> N ranks (1 thread per rank). JSON into bench/results/.

    python bench/bench_distributed.py [--nproc 2] [--quick]

The same measurement as ``gpudiff bench --distributed``.
"""
import argparse
import json
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from gpudiff.benchmark import run_distributed


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    res = run_distributed(a.nproc, quick=a.quick)
    res["load_average"] = os.getloadavg()
    machine = re.sub(r"[^a-z0-9]+", "-", res["machine"].lower()).strip("-")
    path = os.path.join(HERE, "results",
                        f"distributed_{machine}_{time.strftime('%Y%m%d_%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
