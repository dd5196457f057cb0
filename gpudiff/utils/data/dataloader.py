"""DataLoader: batches of gpudiff tensors from a dataset, optionally loaded by worker processes.

Single process (num_workers=0): indices come from the batch sampler, samples from
``dataset[i]``, the batch from ``collate_fn``.

Worker processes (num_workers > 0, forked where the platform allows): the main process
hands index lists to the workers round-robin, keeping ``prefetch_factor * num_workers``
batches in flight, and yields the results in task order, so batches come out exactly as
with num_workers=0. A worker's exception is re-raised in the main process with the
worker's traceback in its message; a worker that dies (killed, segfault) raises a
RuntimeError naming its pid. Workers stop when the epoch ends, when the iterator is
dropped, or when the main process disappears. Each worker seeds gpudiff's global RNG,
numpy's and Python's with ``base_seed + worker_id`` (``base_seed`` drawn per epoch from the
loader's ``generator`` or gpudiff's global RNG), so random transforms differ across workers
and are reproducible after ``gpudiff.manual_seed``.
"""
import itertools
import multiprocessing
import os
import pickle
import queue
import time

import numpy as np

from .. import _random
from . import _worker
from .collate import default_collate, default_convert
from .dataset import IterableDataset
from .sampler import BatchSampler, RandomSampler, SequentialSampler


def _default_mp_context():
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else methods[0])


class DataLoader:
    """Iterate a dataset in batches of gpudiff tensors.

    Arguments follow ``torch.utils.data.DataLoader``: dataset, batch_size=1, shuffle=None,
    sampler=None, batch_sampler=None, num_workers=0, collate_fn=None, pin_memory=False,
    drop_last=False, timeout=0, worker_init_fn=None, multiprocessing_context=None,
    generator=None, and keyword-only prefetch_factor=None (2 with workers),
    persistent_workers=False.

    ``generator``: None (shuffle from gpudiff's global RNG), an int seed, a
    ``numpy.random.Generator`` or a generator object with ``initial_seed()``.
    ``pin_memory`` is accepted and has no effect (batches are host tensors; moving them to a
    GPU is the training loop's ``.to(device)``).

    >>> import numpy as np
    >>> from gpudiff.utils.data import TensorDataset
    >>> ds = TensorDataset(np.arange(10, dtype=np.float32), np.arange(10))
    >>> [y.tolist() for _, y in DataLoader(ds, batch_size=4)]
    [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    """

    def __init__(self, dataset, batch_size=1, shuffle=None, sampler=None, batch_sampler=None,
                 num_workers=0, collate_fn=None, pin_memory=False, drop_last=False, timeout=0,
                 worker_init_fn=None, multiprocessing_context=None, generator=None, *,
                 prefetch_factor=None, persistent_workers=False):
        if not isinstance(num_workers, (int, np.integer)) or isinstance(num_workers, bool) \
                or num_workers < 0:
            raise ValueError("num_workers option should be non-negative; "
                             "use num_workers=0 to disable multiprocessing.")
        if timeout < 0:
            raise ValueError("timeout option should be non-negative")
        if num_workers == 0 and prefetch_factor is not None:
            raise ValueError("prefetch_factor option could only be specified in "
                             "multiprocessing. Let num_workers > 0 to enable multiprocessing, "
                             "otherwise set prefetch_factor to None.")
        if num_workers > 0 and prefetch_factor is None:
            prefetch_factor = 2
        if prefetch_factor is not None and prefetch_factor < 1:
            raise ValueError("prefetch_factor option should be a positive integer")
        if persistent_workers and num_workers == 0:
            raise ValueError("persistent_workers option needs num_workers > 0")

        self.dataset = dataset
        self.num_workers = int(num_workers)
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self.timeout = timeout
        self.worker_init_fn = worker_init_fn
        self.multiprocessing_context = multiprocessing_context
        self.persistent_workers = persistent_workers
        self.generator = generator
        # an int seed becomes one numpy Generator shared by the sampler and the worker seeds,
        # so each epoch continues the stream instead of repeating it
        self._gen_source = (np.random.default_rng(int(generator))
                            if isinstance(generator, (int, np.integer))
                            and not isinstance(generator, bool) else generator)
        self._is_iterable = isinstance(dataset, IterableDataset)

        if self._is_iterable:
            if shuffle not in (None, False):
                raise ValueError("DataLoader with IterableDataset: expected unspecified shuffle "
                                 f"option, but got shuffle={shuffle}")
            if sampler is not None:
                raise ValueError("DataLoader with IterableDataset: expected unspecified sampler "
                                 f"option, but got sampler={sampler}")
            if batch_sampler is not None:
                raise ValueError("DataLoader with IterableDataset: expected unspecified "
                                 f"batch_sampler option, but got batch_sampler={batch_sampler}")
        else:
            shuffle = bool(shuffle)
            if sampler is not None and shuffle:
                raise ValueError("sampler option is mutually exclusive with shuffle")
            if batch_sampler is not None:
                if batch_size != 1 or shuffle or sampler is not None or drop_last:
                    raise ValueError("batch_sampler option is mutually exclusive with "
                                     "batch_size, shuffle, sampler, and drop_last")
                batch_size = None
                drop_last = False
            elif batch_size is None and drop_last:
                raise ValueError("batch_size=None option disables auto-batching and is mutually "
                                 "exclusive with drop_last")
            if sampler is None:
                sampler = (RandomSampler(dataset, generator=self._gen_source) if shuffle
                           else SequentialSampler(dataset))
            if batch_size is not None and batch_sampler is None:
                batch_sampler = BatchSampler(sampler, batch_size, drop_last)
        if batch_size is not None and (isinstance(batch_size, bool) or batch_size <= 0):
            raise ValueError("batch_size should be a positive integer value, "
                             f"but got batch_size={batch_size}")

        self.batch_size = batch_size
        self.drop_last = drop_last
        self.sampler = sampler
        self.batch_sampler = batch_sampler
        if collate_fn is None:
            collate_fn = default_collate if self._auto_collation else default_convert
        self.collate_fn = collate_fn
        self._pool = None        # persistent workers live here between epochs
        self._epoch = 0

    @property
    def _auto_collation(self):
        if self._is_iterable:
            return self.batch_size is not None
        return self.batch_sampler is not None

    @property
    def _index_sampler(self):
        # what yields one task's indices: lists (batching) or single indices
        return self.batch_sampler if self._auto_collation else self.sampler

    def __len__(self):
        if self._is_iterable:
            n = len(self.dataset)
            if self.batch_size is None:
                return n
            return n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return len(self._index_sampler)

    def _base_seed(self):
        if self._gen_source is None:
            return _random.global_seed()
        return int(_random.numpy_rng(self._gen_source).integers(0, 2 ** 63 - 1))

    def __iter__(self):
        # drawn on every pass, workers or not (as PyTorch does), so the shuffle order does
        # not depend on num_workers
        base_seed = self._base_seed()
        if self.num_workers == 0:
            return self._single_process_iter()
        self._epoch += 1
        if self.persistent_workers:
            if self._pool is None or not self._pool.alive:
                self._pool = _WorkerPool(self, base_seed)
            return _MultiProcessIter(self, self._pool, self._epoch, owns_pool=False)
        return _MultiProcessIter(self, _WorkerPool(self, base_seed), self._epoch, owns_pool=True)

    def _single_process_iter(self):
        if self._is_iterable:
            it = iter(self.dataset)
            while True:
                try:
                    batch = _worker._iter_next_batch(it, self.batch_size, self.drop_last,
                                                     self._auto_collation, self.collate_fn)
                except StopIteration:
                    return
                yield batch
        else:
            for indices in self._index_sampler:
                yield _worker._fetch(self.dataset, indices, self._auto_collation,
                                     self.collate_fn)

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown()


class _WorkerPool:
    """``num_workers`` processes, each with its own index queue, sharing one result queue."""

    def __init__(self, loader, base_seed):
        ctx = loader.multiprocessing_context
        if ctx is None:
            ctx = _default_mp_context()
        elif isinstance(ctx, str):
            ctx = multiprocessing.get_context(ctx)
        self.timeout = loader.timeout
        self.result_queue = ctx.Queue()
        self.index_queues, self.workers = [], []
        self.alive = True
        ppid = os.getpid()
        try:
            for wid in range(loader.num_workers):
                iq = ctx.Queue()
                iq.cancel_join_thread()      # never block our exit on undelivered tasks
                w = ctx.Process(
                    target=_worker.worker_loop,
                    args=(loader.dataset, iq, self.result_queue, loader.collate_fn,
                          loader._auto_collation, loader.batch_size, loader.drop_last,
                          loader._is_iterable, base_seed + wid, wid, loader.num_workers,
                          loader.worker_init_fn, ppid),
                    daemon=True)
                w.start()
                self.index_queues.append(iq)
                self.workers.append(w)
        except BaseException:
            self.shutdown()
            raise

    def put(self, worker_id, task):
        self.index_queues[worker_id].put(task)

    def get(self):
        """(epoch, task_id, payload) of the next result from any worker; raises RuntimeError
        if a worker died or ``timeout`` seconds passed without a result."""
        deadline = time.monotonic() + self.timeout if self.timeout else None
        while True:
            # wake up 4 times a second to notice a dead worker
            wait = 0.25 if deadline is None else max(0.0, min(0.25, deadline - time.monotonic()))
            try:
                epoch, task_id, data = self.result_queue.get(timeout=wait)
                return epoch, task_id, pickle.loads(data)
            except queue.Empty:
                dead = [w for w in self.workers if not w.is_alive()]
                if dead:
                    pids = ", ".join(f"{w.pid} (exit code {w.exitcode})" for w in dead)
                    self.shutdown(wait=0.1)
                    raise RuntimeError(f"DataLoader worker(s) exited unexpectedly: pid {pids}")
                if deadline is not None and time.monotonic() >= deadline:
                    raise RuntimeError(f"DataLoader timed out after {self.timeout} seconds")

    def shutdown(self, wait=5.0):
        """Tell the workers to stop, give them ``wait`` seconds to finish, then terminate."""
        if not self.alive:
            return
        self.alive = False
        for iq in self.index_queues:
            try:
                iq.put(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + wait
        for w in self.workers:
            w.join(timeout=max(0.0, deadline - time.monotonic()))
            if w.is_alive():                 # stuck in a long __getitem__: stop it
                w.terminate()
                w.join(timeout=1.0)
        for q in self.index_queues + [self.result_queue]:
            q.cancel_join_thread()
            q.close()


class _MultiProcessIter:
    """One epoch over a worker pool; yields batches in task order."""

    def __init__(self, loader, pool, epoch, owns_pool):
        self._loader = loader
        self._pool = pool
        self._epoch = epoch
        self._owns_pool = owns_pool
        self._auto = loader._auto_collation
        self._index_iter = None if loader._is_iterable else iter(loader._index_sampler)
        n = loader.num_workers
        self._cycle = itertools.cycle(range(n))
        self._active = [True] * n          # False once an iterable worker ran dry
        self._tasks = {}                   # task_id -> [worker_id] or [worker_id, payload]
        self._send_idx = 0
        self._rcvd_idx = 0
        self._done = False
        for _ in range(loader.prefetch_factor * n):
            if not self._put_task():
                break

    def __iter__(self):
        return self

    def __len__(self):
        return len(self._loader)

    def _put_task(self):
        for _ in range(len(self._active)):
            wid = next(self._cycle)
            if self._active[wid]:
                break
        else:
            return False
        if self._index_iter is None:
            indices = None
        else:
            try:
                indices = next(self._index_iter)
            except StopIteration:
                return False
        self._pool.put(wid, (self._epoch, self._send_idx, indices))
        self._tasks[self._send_idx] = [wid]
        self._send_idx += 1
        return True

    def __next__(self):
        # a worker's exception is raised here, after the bookkeeping: the epoch can go on
        return self._process(self._next_payload())

    def _next_payload(self):
        if self._done:
            raise StopIteration
        try:
            while True:
                # drop tasks that will never produce data (their worker ran dry)
                while self._rcvd_idx < self._send_idx:
                    info = self._tasks[self._rcvd_idx]
                    if len(info) == 2 and isinstance(info[1], _worker._Exhausted):
                        pass
                    elif len(info) == 2 or self._active[info[0]]:
                        break
                    del self._tasks[self._rcvd_idx]
                    self._rcvd_idx += 1
                    self._put_task()
                else:
                    self._finish()
                    raise StopIteration
                info = self._tasks[self._rcvd_idx]
                if len(info) == 2:
                    del self._tasks[self._rcvd_idx]
                    self._rcvd_idx += 1
                    self._put_task()
                    return info[1]
                epoch, task_id, payload = self._pool.get()
                if epoch != self._epoch or task_id not in self._tasks:
                    continue      # from an abandoned earlier epoch, or a task already skipped
                if isinstance(payload, _worker._Exhausted):
                    self._active[self._tasks[task_id][0]] = False
                self._tasks[task_id].append(payload)
        except StopIteration:
            raise
        except BaseException:
            # timeout, dead worker, Ctrl-C: do not wait for batches nobody will read
            self._finish(wait=0.1)
            raise

    def _process(self, payload):
        if isinstance(payload, _worker._WorkerError):
            payload.reraise()
        return _worker._unpack(payload)

    def _finish(self, wait=5.0):
        self._done = True
        if self._owns_pool:
            self._pool.shutdown(wait)

    def __del__(self):
        # an abandoned iterator (a `break` out of the loop): the workers' current items are
        # not worth waiting long for
        if getattr(self, "_owns_pool", False):
            self._pool.shutdown(wait=1.0)
