"""The DataLoader's worker processes: the loop each one runs, and what travels between them.

Protocol (one index queue per worker, one shared result queue):
  main -> worker   (epoch, task_id, indices)   indices: a list of dataset indices
                        (map-style), an int (batch_size=None: one sample), or None (next
                        batch of an IterableDataset); None alone = stop. A new epoch restarts
                        an IterableDataset's iterator (persistent workers).
  worker -> main   (epoch, task_id, payload)   payload: pickled bytes of a packed batch, a
                        _WorkerError, or an _Exhausted marker (an iterable worker ran dry).
The worker pickles each payload itself, so an unpicklable batch becomes an error the main
process sees, instead of being dropped silently by the queue's feeder thread.
"""
import ctypes
import os
import pickle
import queue
import signal
import sys
import traceback
from dataclasses import dataclass

import numpy as np

from .. import _random
from .._tensor import from_numpy, is_tensor, to_numpy
from .collate import default_collate
from .dataset import TensorDataset


class _Exhausted:
    """Sent by a worker whose IterableDataset iterator is finished for this epoch."""


@dataclass(frozen=True)
class WorkerInfo:
    """What ``get_worker_info()`` returns inside a worker (None in the main process)."""
    id: int
    num_workers: int
    seed: int
    dataset: object


_worker_info = None


def get_worker_info():
    """Inside a DataLoader worker: its WorkerInfo (id, num_workers, seed, dataset copy).
    In the main process: None."""
    return _worker_info


class _PackedTensor:
    """A gpudiff tensor in transit: its host array (pickles as plain numpy data)."""
    __slots__ = ("array",)

    def __init__(self, array):
        self.array = array


def _pack(obj):
    """Replace gpudiff tensors in a batch (nested lists/tuples/dicts) by _PackedTensor."""
    if is_tensor(obj):
        return _PackedTensor(to_numpy(obj))
    if isinstance(obj, dict):
        out = {k: _pack(v) for k, v in obj.items()}
        if type(obj) is not dict:
            try:
                return type(obj)(out)
            except TypeError:
                pass
        return out
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_pack(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_pack(v) for v in obj)
    return obj


def _unpack(obj):
    """Inverse of _pack, in the main process."""
    if isinstance(obj, _PackedTensor):
        return from_numpy(obj.array)
    if isinstance(obj, dict):
        out = {k: _unpack(v) for k, v in obj.items()}
        if type(obj) is not dict:
            try:
                return type(obj)(out)
            except TypeError:
                pass
        return out
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_unpack(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unpack(v) for v in obj)
    return obj


class _WorkerError:
    """An exception raised in a worker, carried to the main process with its traceback."""

    def __init__(self, worker_id, exc, where="in DataLoader worker process"):
        self.exc_type = type(exc)
        self.where = f"{where} {worker_id}"
        self.text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))

    def reraise(self):
        msg = f"Caught {self.exc_type.__name__} {self.where}.\nOriginal {self.text}"
        if self.exc_type is KeyError:
            # KeyError shows repr(message); wrap so the traceback text stays readable
            raise KeyError(_KeyErrorMessage(msg))
        try:
            err = self.exc_type(msg)
        except Exception:  # noqa: BLE001 (the type cannot be built from one message string)
            raise RuntimeError(msg) from None
        raise err


class _KeyErrorMessage(str):
    def __repr__(self):
        return str(self)


def _dumps(worker_id, payload):
    try:
        return pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:  # noqa: BLE001 (any failure to pickle goes to the main process)
        err = _WorkerError(worker_id, e, where="while sending a batch from DataLoader worker")
        try:
            return pickle.dumps(err, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # noqa: BLE001 (the exception class itself does not pickle)
            err.exc_type = RuntimeError
            return pickle.dumps(err, protocol=pickle.HIGHEST_PROTOCOL)


def _fetch(dataset, indices, auto_collation, collate_fn):
    if not auto_collation:                  # batch_size=None: one sample per task
        return collate_fn(dataset[indices])
    if collate_fn is default_collate and type(dataset) is TensorDataset:
        batch = _take_rows(dataset.tensors, indices)
        if batch is not None:
            return batch
    getitems = getattr(dataset, "__getitems__", None)
    if callable(getitems):
        data = getitems(indices)
    else:
        data = [dataset[i] for i in indices]
    return collate_fn(data)


def _take_rows(tensors, indices):
    """TensorDataset + default_collate in one fancy index per tensor (what stacking the
    rows one by one gives), for host tensors and numeric numpy arrays; None otherwise."""
    arrays = []
    for t in tensors:
        if is_tensor(t) and t.device.type == "cpu":
            arrays.append(np.asarray(t.array))
        elif isinstance(t, np.ndarray) and t.dtype.kind in "biuf":
            arrays.append(t)
        else:
            return None
    idx = np.asarray(indices, dtype=np.int64)
    return [from_numpy(a[idx]) for a in arrays]     # a list, as default_collate gives


def _iter_next_batch(it, batch_size, drop_last, auto_collation, collate_fn):
    """Next batch of an iterable dataset's iterator ``it``; raises StopIteration when dry."""
    if not auto_collation:
        return collate_fn(next(it))
    data = []
    for _ in range(batch_size):
        try:
            data.append(next(it))
        except StopIteration:
            break
    if not data or (drop_last and len(data) < batch_size):
        raise StopIteration
    return collate_fn(data)


def _single_threaded_kernels():
    """One OpenMP thread in this worker, as PyTorch does in its workers (torch.set_num_threads(1)
    there): N workers x all cores would oversubscribe the CPU, and gcc's OpenMP thread pool
    does not survive fork - a worker whose first parallel kernel (gpudiff._C) wants the
    parent's pool threads waits for them forever. A team of one never uses the pool."""
    os.environ["OMP_NUM_THREADS"] = "1"            # for anything this worker starts
    try:
        ctypes.CDLL("libgomp.so.1").omp_set_num_threads(1)   # the libgomp _C is linked with
    except (OSError, AttributeError):
        pass                                      # no libgomp here: nothing to limit


def worker_loop(dataset, index_queue, result_queue, collate_fn, auto_collation, batch_size,
                drop_last, is_iterable, seed, worker_id, num_workers, worker_init_fn, ppid):
    """Body of worker ``worker_id``: fetch what the main process asks for, until told to stop
    (None), or until the main process is gone."""
    global _worker_info
    # Ctrl-C goes to the whole process group: let the main process handle it and shut us down
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _single_threaded_kernels()
    _random.seed_all(seed)
    _worker_info = WorkerInfo(id=worker_id, num_workers=num_workers, seed=seed, dataset=dataset)
    init_error = None
    try:
        if worker_init_fn is not None:
            worker_init_fn(worker_id)
    except Exception as e:  # noqa: BLE001 (user code: report it, do not die)
        init_error = _WorkerError(worker_id, e)
    it = None
    exhausted = False
    current_epoch = None
    while True:
        try:
            task = index_queue.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != ppid:        # orphaned: the main process died
                break
            continue
        if task is None:
            break
        epoch, task_id, indices = task
        if epoch != current_epoch:          # a new pass: restart the stream
            current_epoch, it, exhausted = epoch, None, False
        if init_error is not None:
            payload = init_error
        elif is_iterable:
            if exhausted:
                payload = _Exhausted()
            else:
                try:
                    if it is None:
                        it = iter(dataset)
                    payload = _pack(_iter_next_batch(it, batch_size, drop_last, auto_collation,
                                                     collate_fn))
                except StopIteration:
                    exhausted = True
                    payload = _Exhausted()
                except Exception as e:  # noqa: BLE001 (user code: re-raised in the main process)
                    payload = _WorkerError(worker_id, e)
        else:
            try:
                payload = _pack(_fetch(dataset, indices, auto_collation, collate_fn))
            except Exception as e:  # noqa: BLE001 (user code: re-raised in the main process)
                payload = _WorkerError(worker_id, e)
        result_queue.put((epoch, task_id, _dumps(worker_id, payload)))
        del payload
    # do not block process exit on results the main process will never read
    result_queue.cancel_join_thread()
    result_queue.close()
    sys.stdout.flush()
