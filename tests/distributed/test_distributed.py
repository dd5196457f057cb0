"""gpudiff.distributed, DDP, SyncBatchNorm, DistributedSampler and the fault handling, run
as real 2-rank jobs: ``mpiexec -n 2 python <script>`` (MPICH from the mpich wheel, which the
test extra installs). Few launches, each a second or two: the scripts do many checks each.
"""
import os
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _mpi_ready():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install -e '.[test]' installs it)"
    from gpudiff.distributed.launch import find_mpiexec
    if find_mpiexec() is None:
        return "no mpiexec (pip install mpich)"
    return None


_why = _mpi_ready()
needs_mpi = pytest.mark.skipif(_why is not None, reason=_why or "")


def mpirun(args, n=2, timeout=120, env_extra=None):
    """Run ``args`` (after the python executable) as ``n`` ranks; (rc, stdout, stderr, s)."""
    from gpudiff.distributed.launch import mpiexec_command, rank_env
    env = rank_env(n)
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", GPUDIFF_CUDA="emulate",
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    env.pop("GPUDIFF_DIST_TIMEOUT", None)
    env.update(env_extra or {})
    t0 = time.perf_counter()
    p = subprocess.run(mpiexec_command(n, [sys.executable] + list(args)), env=env,
                       capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                       check=False)
    return p.returncode, p.stdout, p.stderr, time.perf_counter() - t0


@needs_mpi
def test_collectives_ddp_syncbn_sampler_two_ranks():
    """Every collective on cpu and emulated cuda; DDP (2 ranks x 32) == 1 process x 64 after
    4 SGD-momentum steps, plain and with SyncBatchNorm, one and several buckets, a weight
    used twice, no_sync; DistributedSampler's partition."""
    rc, out, err, _ = mpirun([os.path.join(HERE, "ranks_main.py")])
    assert rc == 0, out + err
    assert "RANK 0 OK" in out and "RANK 1 OK" in out, out + err
    assert "bn=True bucket_cap_mb=0.001" in out


@needs_mpi
@pytest.mark.parametrize("n", [2, 3])
def test_shared_memory_all_reduce_equals_mpi(n):
    """all_reduce through the MPI-3 shared-memory window == MPI's Allreduce, bitwise equal on
    every rank (3 ranks oversubscribe 2 cores: tiny messages only)."""
    rc, out, err, _ = mpirun([os.path.join(HERE, "shm_main.py")], n=n)
    assert rc == 0, out + err
    for r in range(n):
        assert f"RANK {r} OK" in out, out + err


@needs_mpi
def test_exception_on_one_rank_ends_the_job():
    rc, out, err, secs = mpirun([os.path.join(HERE, "fault_main.py"), "raise"], timeout=60)
    assert rc != 0 and secs < 30, (rc, secs)
    assert "[rank 1] ValueError: rank 1 failed on purpose at step 5" in err, err
    assert "unreachable" not in out


@needs_mpi
def test_ranks_with_different_models_fail_at_ddp_construction():
    rc, _, err, secs = mpirun([os.path.join(HERE, "fault_main.py"), "mismatch"], timeout=60)
    assert rc != 0 and secs < 30
    assert "the ranks' models differ (rank 0 has 0.weight [10, 8] float32, rank 1 has " \
           "0.weight [20, 8] float32)" in err, err


@needs_mpi
def test_collective_timeout_ends_the_job_naming_it():
    rc, out, err, secs = mpirun([os.path.join(HERE, "fault_main.py"), "timeout"], timeout=60)
    assert rc != 0 and secs < 30, (rc, secs)
    assert "collective all_reduce (#1 on this rank) waited" in err, err
    assert "unreachable" not in out


def test_watchdog_names_a_stuck_nccl_collective():
    """NCCL work never blocks the host, so the watchdog polls its CUDA event: one not done
    past the timeout is reported by name (a stand-in event here; no GPU needed), and a done
    one is forgotten."""
    from gpudiff.distributed import _fault

    class Event:
        done = False
    old = _fault._state["timeout"]
    _fault._events.clear()
    try:
        _fault.set_timeout(5.0)
        stuck, finished = Event(), Event()
        _fault.track("DDP bucket 0 all_reduce", 7, stuck)
        _fault.track("broadcast", 8, finished)
        now = time.monotonic()
        assert _fault.overdue(now + 1.0) is None
        finished.done = True
        msg = _fault.overdue(now + 6.0)
        assert msg is not None and "collective DDP bucket 0 all_reduce (#7 on this rank) " \
            "on the GPU (NCCL) waited" in msg and "timeout of 5s" in msg, msg
        assert len(_fault._events) == 1            # the finished one was forgotten
        stuck.done = True
        assert _fault.overdue(now + 60.0) is None and not _fault._events
    finally:
        _fault.set_timeout(old)
        _fault._events.clear()


def test_single_process_world():
    """Without a launcher the job is one rank; collectives are identities. (In a child
    process: MPI is initialised once per process.)"""
    if _why is not None and "mpi4py" in _why:
        pytest.skip(_why)
    code = ("import gpudiff as t, gpudiff.distributed as d\n"
            "d.init_process_group()\n"
            "x = t.ones(3); d.all_reduce(x, op=d.ReduceOp.AVG); l = [t.zeros(3)]\n"
            "d.all_gather(l, x); d.broadcast(x, 0); d.barrier()\n"
            "assert (d.get_rank(), d.get_world_size()) == (0, 1) and l[0].tolist() == [1.0]*3\n"
            "d.destroy_process_group(); print('ok')\n")
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, env=env, check=False)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stdout + p.stderr


@pytest.mark.parametrize("n,replicas,drop_last", [(10, 3, False), (10, 3, True), (11, 4, False),
                                                  (2, 5, False), (7, 2, True), (12, 4, True)])
def test_distributed_sampler_partitions_as_pytorch(n, replicas, drop_last):
    from torch.utils.data.distributed import DistributedSampler as TorchSampler

    from gpudiff.utils.data import DistributedSampler
    shares = []
    for rank in range(replicas):
        ours = DistributedSampler(range(n), replicas, rank, shuffle=False, drop_last=drop_last)
        theirs = TorchSampler(range(n), replicas, rank, shuffle=False, drop_last=drop_last)
        assert list(ours) == list(theirs) and len(ours) == len(theirs)
        shuf = DistributedSampler(range(n), replicas, rank, shuffle=True, seed=5,
                                  drop_last=drop_last)
        shuf.set_epoch(2)
        shares.append(list(shuf))
        assert len(shares[-1]) == len(theirs)
    flat = [i for s in shares for i in s]
    if drop_last:
        assert len(set(flat)) == len(flat)            # disjoint
    else:
        assert set(flat) == set(range(n))             # every sample, padding repeats some
    with pytest.raises(ValueError, match="Invalid rank 3"):
        DistributedSampler(range(n), 3, 3)


@pytest.mark.gpu
def test_nccl_collectives_and_ddp_on_gpus():
    """NCCL path: needs >= 2 GPUs (one per rank) and CuPy with NCCL. Not yet run on a GPU."""
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 2:
            pytest.skip("needs 2 GPUs")
        from cupy.cuda import nccl  # noqa: F401
    except Exception as e:   # noqa: BLE001
        pytest.skip(f"no CuPy/NCCL/GPU: {e}")
    if _why is not None:
        pytest.skip(_why)
    rc, out, err, _ = mpirun([os.path.join(HERE, "nccl_main.py")],
                             env_extra={"GPUDIFF_CUDA": ""})
    assert rc == 0 and "RANK 0 OK" in out, out + err


@needs_mpi
def test_train_nproc_2_then_resume_with_1_rank(tmp_path):
    """`gpudiff train --nproc 2`: rank 0 alone prints and writes; the global batch is split,
    so the run equals a 1-process run (LeNet, no BatchNorm or dropout), and its checkpoint
    resumes in one process."""
    from gpudiff.distributed.launch import rank_env
    env = rank_env(2)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    common = ["--model", "lenet", "--limit", "200", "--no-progress"]

    def train(*args):
        p = subprocess.run([sys.executable, "-m", "gpudiff", "train", *common, *args],
                           env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
                           check=False)
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout

    two = tmp_path / "two"
    out = train("--nproc", "2", "--epochs", "1", "--out", str(two))
    assert out.count("epoch 1/1") == 1 and "x 2 ranks" in out and "32-32 per rank" in out
    assert sorted(os.listdir(two)) == ["checkpoint", "curves.png", "metrics.csv",
                                       "metrics.json"]
    out = train("--epochs", "2", "--out", str(two), "--resume")
    assert "resumed from" in out
    one = tmp_path / "one"
    train("--epochs", "2", "--out", str(one))
    import json
    a = json.loads((two / "metrics.json").read_text())["epochs"]
    b = json.loads((one / "metrics.json").read_text())["epochs"]
    for ra, rb in zip(a, b):
        assert abs(ra["train_loss"] - rb["train_loss"]) <= 1e-5 * abs(rb["train_loss"])
        assert ra["test_acc"] == rb["test_acc"]
