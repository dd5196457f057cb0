"""Starting N ranks through the installed ``mpiexec`` (``gpudiff train --nproc N``, tests).

``pip install "gpudiff[distributed]"`` brings mpi4py and the ``mpich`` wheel, whose
``mpiexec`` (MPICH's Hydra) sits next to the Python executable and runs as root without
extra flags. An Open MPI ``mpiexec`` found on PATH instead also works: it gets
``--oversubscribe`` (and the OMPI_ALLOW_RUN_AS_ROOT variables when run as root).

Threads: N ranks share the machine's cores, so each rank gets cores // N OpenMP / BLAS
threads unless OMP_NUM_THREADS is already set (2 ranks on 2 cores: 1 thread each).
"""
import functools
import os
import shutil
import subprocess
import sys


class LaunchError(RuntimeError):
    """No mpiexec to start the ranks with (a one-line message for the CLI)."""


@functools.cache
def find_mpiexec():
    """Path of the mpiexec to use: the one installed beside this Python (the mpich wheel)
    first, then PATH; None when there is none."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.path.isfile(here) and os.access(here, os.X_OK):
        return here
    return shutil.which("mpiexec")


@functools.cache
def _is_open_mpi(mpiexec):
    try:
        out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                             timeout=20, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "Open MPI" in out or "OpenRTE" in out


def rank_env(nproc, env=None):
    """The environment for the ranks: threads per rank = cores // nproc (unless set)."""
    env = dict(os.environ if env is None else env)
    threads = str(max(1, (os.cpu_count() or 1) // max(1, nproc)))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, env.get("OMP_NUM_THREADS", threads))
    env["PYTHONUNBUFFERED"] = "1"          # rank 0's lines appear as they are printed
    return env


def mpiexec_command(nproc, argv, mpiexec=None):
    """[mpiexec, -n, N, ...argv] for this machine's MPI."""
    mpiexec = mpiexec or find_mpiexec()
    if mpiexec is None:
        raise LaunchError("no mpiexec found: pip install 'gpudiff[distributed]' (mpi4py and "
                          "the mpich wheel, which brings mpiexec), or install an MPI")
    cmd = [mpiexec, "-n", str(int(nproc))]
    if _is_open_mpi(mpiexec):
        cmd.append("--oversubscribe")
    return cmd + list(argv)


def launch(nproc, argv, env=None, **popen_kw):
    """Run ``argv`` as ``nproc`` ranks and wait; returns the exit status of the job."""
    env = rank_env(nproc, env)
    cmd = mpiexec_command(nproc, argv)
    if hasattr(os, "geteuid") and os.geteuid() == 0 and _is_open_mpi(cmd[0]):
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return subprocess.call(cmd, env=env, **popen_kw)


def under_mpi_launcher():
    """True when this process was started by mpiexec (MPICH's Hydra, Open MPI, Slurm's
    PMI): then ``gpudiff train`` joins the job as one of its ranks."""
    keys = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
    return any(k in os.environ for k in keys)


def launcher_world_size():
    for k in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if k in os.environ:
            return int(os.environ[k])
    return None
