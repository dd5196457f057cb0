"""The tape: nodes, saved tensors and the backward pass. No device code in here.

Each op run with grad enabled, on an input that requires grad, records a Node with a rising
sequence number. A Node points to where its inputs' gradients go (``next``: the producing
node and output number, or the leaf tensor itself) and keeps what its backward needs in
``ctx`` (SavedTensors). ``backward`` pops reachable nodes in descending sequence order from
a heap (a node's seq is larger than that of every node it consumed, so when it pops, all of
its output gradients have arrived), calls the node's backward on Tensors, and frees the
saved arrays unless ``retain_graph``. Backward rules are written in gpudiff ops, so with
``create_graph=True`` they are themselves recorded: double backward.
"""
import heapq
import itertools
import weakref
from time import perf_counter_ns

from ..runtime import capture as _capture
from ..runtime import events
from ..runtime.dtypes import is_floating as _is_floating
from .grad_mode import enable_grad, is_anomaly_enabled, no_grad, set_detect_anomaly

_seq = itertools.count()

#: the Tensor class, handed over once by gpudiff/tensor.py (the tape sits below it and never
#: imports it): saved tensors and gradients are wrapped in it
Tensor = None


def set_tensor_type(cls):
    global Tensor
    Tensor = cls


class SavedTensor:
    """An array saved for backward, with what is needed to check and rebuild it.

    Unpacking checks the version counter (an in-place change after saving raises) and gives
    back a Tensor connected to the graph (the leaf itself, or a Tensor whose grad_fn is the
    producer), so backward formulas that use it are differentiable.
    """

    __slots__ = ("array", "version", "saved_version", "leaf", "grad_fn", "output_nr",
                 "requires_grad", "device", "weak")

    def __init__(self, array, device, tensor=None, grad_fn=None, output_nr=0, owner=None):
        self.array = array
        self.device = device
        self.leaf = None
        self.grad_fn = grad_fn
        self.output_nr = output_nr
        self.requires_grad = grad_fn is not None
        self.version = self.saved_version = None
        if tensor is not None:
            self.version = tensor._version
            self.saved_version = tensor._version[0]
            self.requires_grad = tensor.requires_grad
            if tensor.grad_fn is None and tensor.requires_grad:
                self.leaf = tensor
            elif grad_fn is None:
                self.grad_fn, self.output_nr = tensor.grad_fn, tensor._output_nr
            self.requires_grad = self.grad_fn is not None or self.leaf is not None
        # an output saved by the node that made it: a strong link would be a reference
        # cycle (node -> ctx -> saved -> node) keeping a graph that is never backwarded
        # (and its arrays) alive until the cyclic GC runs. The node runs its own backward,
        # so it is alive whenever this is unpacked.
        self.weak = owner is not None and self.grad_fn is owner
        if self.weak:
            self.grad_fn = weakref.ref(owner)

    def unpack_array(self, op_name):
        """The saved array itself, after the same version check as unpack."""
        if self.version is not None and self.version[0] != self.saved_version:
            self.unpack(op_name)  # raises
        return self.array

    def unpack(self, op_name):
        if self.version is not None and self.version[0] != self.saved_version:
            a = self.array
            raise RuntimeError(
                f"one of the variables needed for gradient computation has been modified by an "
                f"inplace operation: [{a.dtype}{list(a.shape)}] is at version {self.version[0]}; "
                f"expected version {self.saved_version} instead (saved by '{op_name}'). "
                f"Use an out-of-place op (or .clone()) before modifying it.")
        if self.leaf is not None:
            return self.leaf
        grad_fn = self.grad_fn() if self.weak else self.grad_fn
        t = Tensor._make(self.array, self.device, grad_fn, self.output_nr)
        t._requires_grad = self.requires_grad and grad_fn is not None
        if self.version is not None:
            t._version = self.version
        return t


class Node:
    """One recorded op: where to send its input gradients, and its backward."""

    __slots__ = ("name", "seq", "next", "ctx", "backward_fn", "backward_arrays", "n_outputs",
                 "out_meta", "pre_hooks", "freed", "__weakref__")

    def __init__(self, name, backward_fn, ctx, inputs, outputs, backward_arrays=None):
        self.name = name
        self.seq = next(_seq)
        self.backward_fn = backward_fn  # (ctx, *gys: Tensor) -> tuple of Tensor | None
        self.backward_arrays = backward_arrays  # the same on raw arrays, or None
        self.ctx = ctx
        # where each input's gradient goes: (node, output_nr), the leaf Tensor, or None
        self.next = [None if (t is None or not t.requires_grad)
                     else (t if t.grad_fn is None else (t.grad_fn, t._output_nr))
                     for t in inputs]
        self.n_outputs = len(outputs)
        # (shape, dtype, device) per output: to make zeros for an output that got no gradient
        self.out_meta = [(None, None, None) if o is None else (o.shape, o.dtype, o.device)
                         for o in outputs]
        self.pre_hooks = None
        self.freed = False

    def add_pre_hook(self, output_nr, fn):
        if self.pre_hooks is None:
            self.pre_hooks = {}
        self.pre_hooks.setdefault(output_nr, []).append(fn)

    def release(self):
        """Free what backward saved (after a backward without retain_graph)."""
        self.ctx.release()
        self.freed = True

    def __repr__(self):
        return f"<{self.name}Backward seq={self.seq}>"

    def __lt__(self, other):  # heap order ties never happen (seq is unique); keep heapq happy
        return self.seq > other.seq


def _accumulate(a, b):
    return b if a is None else (a + b)


def _check_finite(name, grads, what, xp):
    for i, g in enumerate(grads):
        if g is not None and _is_floating(g.dtype) and not bool(xp.isfinite(g).all()):
            raise RuntimeError(f"Function '{name}Backward' returned nan/inf values in its "
                               f"{i}th output ({what}); the forward of '{name}' or its "
                               f"inputs are where to look")


def run_backward(roots, grad_roots, retain_graph=False, create_graph=False, inputs=None,
                 leaf_plan=None, replay=False):
    """Apply the chain rule from ``roots`` (Tensors) seeded with ``grad_roots`` (Tensors).

    With ``inputs`` (autograd.grad): returns their gradients and leaves every ``.grad`` alone.
    Otherwise accumulates into the ``.grad`` of the leaves (and of retain_grad tensors).

    Gradients flow as raw arrays unless ``create_graph``: there is no graph to build, so a node
    whose op has ``backward_arrays`` runs it on arrays, and only the other nodes (and hooks)
    see Tensors. With ``create_graph`` every node's backward runs on Tensors, recorded.

    ``leaf_plan`` (a dict) is a graph capture's record of the leaves' gradient arrays: filled
    while capturing, and with ``replay`` written in place (assigned where the capture made
    the .grad, accumulated where it existed before), as a CUDA graph would.
    """
    arrays = not create_graph

    def wrap(g, device):  # a gradient as a Tensor (for hooks and Tensor backward formulas)
        if not arrays or g is None:
            return g
        return Tensor._make(device.xp.asarray(g), device)  # (a numpy scalar -> 0-d array)

    def unwrap(t):
        return t.array if arrays and t is not None else t

    capture = None
    if inputs is not None:
        capture = {}
        leaf_ids = {id(t): k for k, t in enumerate(inputs) if t.grad_fn is None}
        node_ids = {(id(t.grad_fn), t._output_nr): k for k, t in enumerate(inputs)
                    if t.grad_fn is not None}
        results = [None] * len(inputs)

    heap, buffers = [], {}

    def send(dest, g):
        if isinstance(dest, tuple):  # (node, output_nr): accumulate in that node's buffer
            node, nr = dest
            buf = buffers.get(node)
            if buf is None:
                buf = buffers[node] = [None] * node.n_outputs
                heapq.heappush(heap, node)
            buf[nr] = _accumulate(buf[nr], g)
            return
        leaf = dest
        if leaf._hooks:
            t = wrap(g, leaf.device)
            for h in leaf._hooks:
                r = h(t)
                if r is not None:
                    t = r
            g = unwrap(t)
        if capture is not None:
            k = leaf_ids.get(id(leaf))
            if k is not None:
                results[k] = _accumulate(results[k], g)
            return
        if leaf_plan is not None:
            entry = leaf_plan.get(id(leaf))
            if replay:
                _replay_leaf(leaf, entry, g)
                return
            if entry is None:  # [leaf, its .grad after capture, assign?, written this run?]
                entry = leaf_plan[id(leaf)] = [leaf, None, leaf.grad is None, False]
                if leaf.grad is not None:
                    _capture.active.will_write(leaf.grad.array)
        if leaf.grad is None:
            # own the buffer: the grad must not alias an array the graph still uses
            leaf.grad = Tensor._make(leaf.device.xp.array(g), leaf.device) if arrays else g
            if leaf_plan is not None:
                leaf_plan[id(leaf)][1] = leaf.grad
        elif arrays:
            leaf.grad.array += g  # in place: no new allocation per step
        else:
            leaf.grad = leaf.grad + g

    for t, g in zip(roots, grad_roots):
        if not t.requires_grad:
            raise RuntimeError("element 0 of tensors does not require grad and does not have a "
                               "grad_fn: call requires_grad_() on the inputs, or do not call "
                               "backward() inside no_grad()")
        send(t if t.grad_fn is None else (t.grad_fn, t._output_nr), unwrap(g))

    grad_ctx = enable_grad() if create_graph else no_grad()
    anomaly = is_anomaly_enabled()
    with grad_ctx:
        while heap:
            node = heapq.heappop(heap)
            gys = buffers.pop(node)
            if node.pre_hooks:
                for nr, hooks in node.pre_hooks.items():
                    if gys[nr] is None:
                        continue
                    t = wrap(gys[nr], node.out_meta[nr][2])
                    for h in hooks:
                        r = h(t)
                        if r is not None:
                            t = r
                    gys[nr] = unwrap(t)
            if capture is not None:
                for nr, g in enumerate(gys):
                    k = node_ids.get((id(node), nr))
                    if k is not None and g is not None:
                        results[k] = _accumulate(results[k], g)
            if node.freed:
                raise RuntimeError(
                    f"Trying to backward through the graph a second time (through "
                    f"'{node.name}'), or to use saved tensors after they were freed. Saved "
                    f"arrays are freed after backward(); specify retain_graph=True on the first "
                    f"backward() call if you need to backward through the graph again.")
            if node.ctx.materialize_grads:  # else a Function's backward sees None for them
                gys = [g if g is not None else _zeros(*node.out_meta[i], arrays)
                       for i, g in enumerate(gys)]
            listener = events.listener
            t0 = perf_counter_ns() if listener is not None else 0
            if anomaly:  # check the node's gradients as a whole (below), naming the node,
                set_detect_anomaly(False)  # not the ops its backward formula runs
                try:
                    grads = _call(node, gys, arrays, wrap, unwrap)
                finally:
                    set_detect_anomaly(True)
            else:
                grads = _call(node, gys, arrays, wrap, unwrap)
            if listener is not None:
                listener.backward(node.name, t0, perf_counter_ns())
            if len(grads) < len(node.next):
                grads = tuple(grads) + (None,) * (len(node.next) - len(grads))
            if anomaly:
                _check_finite(node.name, [g if arrays or g is None else g.array for g in grads],
                              "backward", next(m[2] for m in node.out_meta if m[2]).xp)
            if not retain_graph:
                node.release()
            for dest, g, meta in zip(node.next, grads, node.ctx.input_meta):
                if dest is None or g is None:
                    continue
                if g.shape != meta[0]:
                    raise RuntimeError(
                        f"{node.name}: backward returned a gradient of shape {tuple(g.shape)} "
                        f"for an input of shape {tuple(meta[0])}")
                if g.dtype != meta[1]:
                    g = g.astype(meta[1]) if arrays else g.to(meta[1])
                send(dest, g)
    if capture is None:
        return None
    return [wrap(r, t.device) if r is not None else None for r, t in zip(results, inputs)]


def _replay_leaf(leaf, entry, g):
    """A replayed backward's gradient ``g`` for ``leaf``: into the array the capture gave
    its .grad (the optimizer's captured step reads that array)."""
    grad = entry[1]
    if leaf.grad is not grad:
        leaf.grad = grad
    if entry[2] and not entry[3]:  # the first gradient of this replay: overwrite
        grad.array[...] = g
        entry[3] = True
    else:
        grad.array += g


def _call(node, gys, arrays, wrap, unwrap):
    """Run ``node``'s backward: on arrays where its op has ``backward_arrays`` and no graph is
    being built, else on Tensors (wrapping and unwrapping arrays around it)."""
    if arrays and node.backward_arrays is not None:
        grads = node.backward_arrays(node.ctx, *gys)
        if grads is not NotImplemented:  # (the op declined: its Tensor backward then)
            return grads if isinstance(grads, tuple) else (grads,)
    if arrays:
        gys = [wrap(g, meta[2]) for g, meta in zip(gys, node.out_meta)]
    grads = node.backward_fn(node.ctx, *gys)
    if not isinstance(grads, (tuple, list)):
        grads = (grads,)
    return tuple(unwrap(g) for g in grads) if arrays else grads


def _zeros(shape, dtype, device, arrays):
    z = device.xp.zeros(shape, dtype=dtype)
    return z if arrays else Tensor._make(z, device)


# ---- the entry points: Tensor.backward / autograd.backward and autograd.grad ----------------
def _seed_grads(outputs, grad_outputs):
    seeds = []
    for i, t in enumerate(outputs):
        g = grad_outputs[i] if grad_outputs is not None else None
        if g is None:
            if t.numel() != 1:
                raise RuntimeError(
                    f"grad can be implicitly created only for scalar outputs (output {i} has "
                    f"shape {tuple(t.shape)}): pass gradient=... (a tensor of that shape, e.g. "
                    f"torch.ones_like(out)) to backward()")
            g = Tensor._make(t.device.xp.ones(t.shape, dtype=t.dtype), t.device)
        elif not isinstance(g, Tensor):
            g = Tensor._make(t.device.xp.asarray(g, dtype=t.dtype), t.device)
        if g.shape != t.shape:
            raise RuntimeError(f"Mismatch in shape: grad_output[{i}] has a shape of "
                               f"{tuple(g.shape)} and output[{i}] has a shape of "
                               f"{tuple(t.shape)}.")
        seeds.append(g)
    return seeds


def backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False, inputs=None):
    """Accumulate gradients of ``tensors`` into the leaves' ``.grad``."""
    if isinstance(tensors, Tensor):
        tensors = [tensors]
    if isinstance(grad_tensors, Tensor):
        grad_tensors = [grad_tensors]
    if retain_graph is None:
        retain_graph = create_graph
    seeds = _seed_grads(tensors, grad_tensors)
    plan = _capture.recording()
    if plan is not None:
        if create_graph or inputs is not None:
            raise _capture.CaptureError(
                "backward: create_graph=True and inputs=... are not supported inside a graph "
                "capture (use autograd.grad, or capture a plain loss.backward())")
        _backward_captured(plan, tensors, seeds, retain_graph)
        return
    if inputs is not None:  # only these leaves receive .grad
        inputs = [inputs] if isinstance(inputs, Tensor) else list(inputs)
        grads = run_backward(tensors, seeds, retain_graph, create_graph, inputs=inputs)
        for t, g in zip(inputs, grads):
            if g is not None:
                t.grad = (g if create_graph else g.detach()._own()) if t.grad is None \
                    else t.grad + g
        return
    run_backward(tensors, seeds, retain_graph, create_graph)


def _backward_captured(plan, roots, seeds, retain_graph):
    """``backward`` while a graph is captured: run it once, recording which leaf gradients
    it writes, and add a step that reruns it over the captured nodes (their saved arrays are
    refreshed by the replayed forwards) into the same gradient arrays: a precompiled
    schedule (``_compile``), or ``run_backward`` itself where hooks are involved."""
    leaf_plan = {}
    for t in roots:
        plan.static(t, weakref.ref)
    plan.run(run_backward, roots, seeds, retain_graph, False, None, leaf_plan)
    entries = list(leaf_plan.values())
    compiled = _compile(roots, leaf_plan)

    def step():
        for e in entries:
            e[3] = False
        if compiled is not None and not is_anomaly_enabled() and events.listener is None:
            _run_compiled(compiled, seeds, retain_graph, leaf_plan)
        else:
            run_backward(roots, seeds, retain_graph, False, None, leaf_plan, True)
    plan.add(step)


def _compile(roots, leaf_plan):
    """run_backward's visit of the graph under ``roots``, fixed once for a captured graph:
    the nodes in descending sequence order, each with the slots of its output gradients and
    where each input gradient goes (a slot, or a leaf). None where hooks are involved (a
    hook may do anything: the generic run_backward replays those graphs)."""
    nodes, stack = {}, [t.grad_fn for t in roots if t.grad_fn is not None]
    while stack:
        n = stack.pop()
        if id(n) in nodes:
            continue
        nodes[id(n)] = n
        stack.extend(d[0] for d in n.next if isinstance(d, tuple))
    order = sorted(nodes.values(), key=lambda n: -n.seq)
    slot = {}
    for n in order:
        if n.pre_hooks:
            return None
        for nr in range(n.n_outputs):
            slot[(id(n), nr)] = len(slot)

    def edge(dest, meta):
        if dest is None:
            return None
        if isinstance(dest, tuple):
            return (slot[(id(dest[0]), dest[1])], None, meta)
        if dest._hooks or id(dest) not in leaf_plan:
            raise LookupError
        return (None, dest, meta)
    try:
        sched = [(n, [slot[(id(n), nr)] for nr in range(n.n_outputs)],
                  [edge(d, m) for d, m in zip(n.next, n.ctx.input_meta)], _backward_of(n))
                 for n in order]
        root_edges = [edge(t if t.grad_fn is None else (t.grad_fn, t._output_nr),
                           (t.shape, t.dtype)) for t in roots]
    except LookupError:
        return None
    return sched, len(slot), root_edges


def _backward_of(node):
    """The node's backward on arrays, without the float16/bfloat16 wrapper of its op when
    its gradients cannot be of those dtypes (ops/lowp.py)."""
    bwd = node.backward_arrays
    inner = getattr(bwd, "__wrapped__", None)
    if inner is not None and not any(m[1] is not None and m[1].itemsize == 2 and
                                     m[1].kind in "fV" for m in node.out_meta):
        return inner
    return bwd


def _run_compiled(compiled, seeds, retain_graph, leaf_plan):
    """Replay a captured backward from its schedule (see ``_compile``): the arithmetic of
    run_backward without the heap, the buffers dict or the hooks."""
    sched, n_slots, root_edges = compiled
    slots = [None] * n_slots
    with no_grad():
        _deliver(slots, root_edges, [s.array for s in seeds], leaf_plan)
        for node, out_slots, edges, bwd in sched:
            if len(out_slots) == 1:  # (most nodes: one output)
                i = out_slots[0]
                g = slots[i]
                if g is None:
                    continue
                slots[i] = None
                gys = (g,)
            else:
                gys = [slots[i] for i in out_slots]
                if all(g is None for g in gys):
                    continue
                for i in out_slots:
                    slots[i] = None
                if node.ctx.materialize_grads and any(g is None for g in gys):
                    gys = [g if g is not None else _zeros(*node.out_meta[i], True)
                           for i, g in enumerate(gys)]
            if node.freed:
                raise RuntimeError(f"replay: the saved tensors of '{node.name}' were freed "
                                   f"(replay the forward of this graph before its backward)")
            grads = bwd(node.ctx, *gys) if bwd is not None else NotImplemented  # (_call)
            if grads is NotImplemented:
                grads = _call(node, gys, True, _wrap_array, _unwrap_array)
            elif type(grads) is not tuple:
                grads = (grads,)
            if not retain_graph:
                node.release()
            for e, g in zip(edges, grads):
                if e is None or g is None:
                    continue
                meta = e[2]
                if g.shape != meta[0]:
                    raise RuntimeError(
                        f"{node.name}: backward returned a gradient of shape "
                        f"{tuple(g.shape)} for an input of shape {tuple(meta[0])}")
                if g.dtype != meta[1]:
                    g = g.astype(meta[1])
                s = e[0]
                if s is None:  # a leaf: _replay_leaf, inlined
                    leaf = e[1]
                    entry = leaf_plan[id(leaf)]
                    grad = entry[1]
                    if leaf.grad is not grad:
                        leaf.grad = grad
                    if entry[2] and not entry[3]:
                        grad.array[...] = g
                        entry[3] = True
                    else:
                        grad.array += g
                else:
                    old = slots[s]
                    slots[s] = g if old is None else old + g


def _deliver(slots, edges, grads, leaf_plan):
    for e, g in zip(edges, grads):
        if e is not None and g is not None:
            if e[0] is None:
                _replay_leaf(e[1], leaf_plan[id(e[1])], g)
            else:
                slots[e[0]] = g if slots[e[0]] is None else slots[e[0]] + g


def _wrap_array(g, device):
    return None if g is None else Tensor._make(device.xp.asarray(g), device)


def _unwrap_array(t):
    return None if t is None else t.array


def _grad_captured(plan, outputs, seeds, retain_graph, create_graph, inputs):
    """``grad`` while a graph is captured: the gradients it returns are the capture's static
    tensors, which the recorded step overwrites on each replay."""
    if create_graph:
        raise _capture.CaptureError("autograd.grad: create_graph=True is not supported inside "
                                    "a graph capture")
    res = plan.run(run_backward, outputs, seeds, retain_graph, False, inputs)
    bufs = [None if r is None else r.array for r in res]
    plan.made([r for r in res if r is not None])

    def step():
        new = run_backward(outputs, seeds, retain_graph, False, inputs)
        for b, n in zip(bufs, new):
            if b is not None:
                if n is None:
                    b[...] = 0
                else:
                    b[...] = n.array
    plan.add(step)
    return res


def grad(outputs, inputs, grad_outputs=None, retain_graph=None, create_graph=False,
         allow_unused=False, materialize_grads=False):
    """The gradients of ``outputs`` with respect to ``inputs`` (a tuple), without touching
    any ``.grad``. ``create_graph=True`` makes them differentiable (double backward)."""
    single = isinstance(outputs, Tensor)
    outputs = [outputs] if single else list(outputs)
    inputs_t = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    if isinstance(grad_outputs, Tensor):
        grad_outputs = [grad_outputs]
    for i, t in enumerate(inputs_t):
        if not t.requires_grad:
            raise RuntimeError(f"grad: input {i} does not require grad")
    if retain_graph is None:
        retain_graph = create_graph
    seeds = _seed_grads(outputs, grad_outputs)
    plan = _capture.recording()
    if plan is not None:
        res = _grad_captured(plan, outputs, seeds, retain_graph, create_graph, inputs_t)
    else:
        res = run_backward(outputs, seeds, retain_graph, create_graph, inputs=inputs_t)
    out = []
    for i, (t, g) in enumerate(zip(inputs_t, res)):
        if g is None:
            if materialize_grads:
                g = t.new_zeros(t.shape)
            elif not allow_unused:
                raise RuntimeError(f"One of the differentiated Tensors (input {i}) appears to "
                                   f"not have been used in the graph. Set allow_unused=True if "
                                   f"this is the desired behavior.")
        out.append(g)
    return tuple(out)
