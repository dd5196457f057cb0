"""What `gpudiff train` and `gpudiff bench` share: the machine's name for their records and
the run folder they write into."""
import os
import platform
import time


def cpu_model():
    """The CPU's marketing name (/proc/cpuinfo), or what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def default_out_dir(root="runs", prefix=""):
    """root/<prefix><YYYYmmdd-HHMMSS>, with a -2, -3 ... suffix if that already exists."""
    base = os.path.join(root, prefix + time.strftime("%Y%m%d-%H%M%S"))
    path, k = base, 1
    while os.path.exists(path):
        k += 1
        path = f"{base}-{k}"
    return path
