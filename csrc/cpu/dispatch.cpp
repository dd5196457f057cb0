// The op dispatch fast path: gpudiff/ops/__init__.py's ``apply`` for its common case, in C.
//
// ``Op.apply(*tensors, **params)`` is ``_C.apply(op, *tensors, **params)`` once
// ``dispatch_init`` was called (ops/__init__.py ``_install_fast_apply``). It does what the
// Python ``apply`` does (the one reference: keep the two in step) for the case that covers
// nearly every call of a training step on the CPU or the emulated device:
//   no autocast region, no graph capture, no anomaly mode; every tensor on one Device
//   object on the host (NumPy arrays); the op is not a view op. A profiler (events.listener)
//   gets the same op_begin / op calls, with the same clock (CLOCK_MONOTONIC, that of
//   time.perf_counter_ns on Linux), so it measures this path, not the Python one.
// It checks those first and otherwise hands the call to the Python ``apply`` unchanged. Past
// the forward (the op's own Python, run with the same context object as in Python), the
// unusual cases go back to Python too: outputs that are not plain ndarrays
// (``_as_ndarrays``), the emulated device's memory pool (``runtime.emulated.own``), and a
// node whose forward marked outputs non-differentiable or inputs dirty (``record``).
//
// What it builds is what Python builds: Tensors, the Node and SavedTensors are the Python
// classes (their __slots__ written at the offsets their member descriptors give), the
// FunctionCtx gets the same attributes. Cost: about a microsecond beside the forward, vs ~6
// us for the Python path (bench: ``gpudiff bench`` per-op dispatch table).
#include <Python.h>
#include <structmember.h>

#include <time.h>

#include <unordered_map>

#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace {

struct TensorSlots {
    Py_ssize_t array, device, requires_grad, grad, grad_fn, output_nr, version, hooks,
        retains_grad, base, base_fn;
};
struct NodeSlots {
    Py_ssize_t name, seq, next, ctx, backward_fn, backward_arrays, n_outputs, out_meta,
        pre_hooks, freed;
};
struct CtxSlots {
    Py_ssize_t needs_input_grad, device, op_name, op, materialize_grads, input_meta, out_device,
        to_save, saved, non_diff, dirty;
};
struct SavedSlots {
    Py_ssize_t array, version, saved_version, leaf, grad_fn, output_nr, requires_grad, device,
        weak;
};

struct State {
    bool ready = false;
    PyTypeObject *tensor = nullptr, *node = nullptr, *saved = nullptr, *ctx = nullptr;
    PyObject *ndarray = nullptr;        // numpy.ndarray
    PyObject *grad_state = nullptr;     // autograd.grad_mode._state (thread-local)
    PyObject *autocast_mod = nullptr, *capture_mod = nullptr, *events_mod = nullptr;
    PyObject *ops_mod = nullptr;        // gpudiff.ops: apply, _as_ndarrays
    PyObject *py_apply = nullptr;       // the Python apply: a test that replaces ops.apply
                                        // (to watch the calls) turns the fast path off
    PyObject *function_mod = nullptr;   // gpudiff.autograd.function: record, _save
    PyObject *emulated_own = nullptr;   // runtime.emulated.own
    PyObject *seq = nullptr;            // autograd.graph._seq (itertools.count)
    PyObject *float_dtypes = nullptr;   // tuple: the dtype objects that are floating
                                        // (float32, float64 first)
    PyObject *low_dtypes = nullptr;     // frozenset: float16, bfloat16 (dtypes.LOW_FLOATS)
    PyObject *empty = nullptr;          // ()
    PyObject *zero = nullptr;           // 0
    TensorSlots t{};
    NodeSlots n{};
    SavedSlots s{};
    CtxSlots c{};
    PyObject* host_dev = nullptr;       // the last Device seen on the host (held), so that
                                        // its ``host`` property is not asked every call
};
State S;

// interned attribute names
PyObject *s_state, *s_active, *s_listener, *s_enabled, *s_anomaly, *s_host, *s_type, *s_cuda,
    *s_differentiable, *s_view, *s_forward, *s_backward, *s_backward_arrays, *s_name,
    *s_needs_input_grad, *s_device, *s_op_name, *s_op, *s_out_device, *s_to_save, *s_non_diff,
    *s_dirty, *s_saved, *s_input_meta, *s_shape, *s_dtype, *s_kind, *s_apply, *s_record,
    *s_save, *s_as_ndarrays, *s_f, *s_op_begin;

inline PyObject*& slot(PyObject* o, Py_ssize_t off) {
    return *reinterpret_cast<PyObject**>(reinterpret_cast<char*>(o) + off);
}

// set a slot to a new reference (steals ``v``)
inline void put(PyObject* o, Py_ssize_t off, PyObject* v) {
    PyObject* old = slot(o, off);
    slot(o, off) = v;
    Py_XDECREF(old);
}

// set a slot to a borrowed reference
inline void put_b(PyObject* o, Py_ssize_t off, PyObject* v) {
    Py_INCREF(v);
    put(o, off, v);
}

// An owned reference, released at the end of its scope (release() hands it over).
struct Ref {
    PyObject* p;
    explicit Ref(PyObject* o = nullptr) : p(o) {}
    Ref(const Ref&) = delete;
    Ref& operator=(const Ref&) = delete;
    ~Ref() { Py_XDECREF(p); }
    PyObject* get() const { return p; }
    PyObject* release() {
        PyObject* o = p;
        p = nullptr;
        return o;
    }
    explicit operator bool() const { return p != nullptr; }
};

// (array.shape, array.dtype) or (array.shape, array.dtype, extra): a new tuple, or NULL
PyObject* meta_of(PyObject* array, PyObject* extra = nullptr) {
    Ref shape(PyObject_GetAttr(array, s_shape));
    Ref dtype(shape ? PyObject_GetAttr(array, s_dtype) : nullptr);
    if (!dtype) return nullptr;
    return extra ? PyTuple_Pack(3, shape.get(), dtype.get(), extra)
                 : PyTuple_Pack(2, shape.get(), dtype.get());
}

// items[0..n) as a new tuple, or NULL
PyObject* tuple_of(PyObject* const* items, Py_ssize_t n) {
    PyObject* t = PyTuple_New(n);
    if (t == nullptr) return nullptr;
    for (Py_ssize_t i = 0; i < n; ++i) {
        Py_INCREF(items[i]);
        PyTuple_SET_ITEM(t, i, items[i]);
    }
    return t;
}

// a slot's value as a new reference (AttributeError, as Python, when it was deleted)
inline PyObject* get_slot(PyObject* o, Py_ssize_t off, PyObject* name) {
    PyObject* v = slot(o, off);
    if (v == nullptr) {
        PyErr_SetObject(PyExc_AttributeError, name);
        return nullptr;
    }
    Py_INCREF(v);
    return v;
}

Py_ssize_t member_offset(PyTypeObject* type, const char* name) {
    PyObject* d = PyObject_GetAttrString(reinterpret_cast<PyObject*>(type), name);
    if (d == nullptr) throw py::error_already_set();
    if (!Py_IS_TYPE(d, &PyMemberDescr_Type)) {
        Py_DECREF(d);
        throw std::runtime_error(std::string("dispatch_init: ") + type->tp_name + "." + name +
                                 " is not a __slots__ member");
    }
    Py_ssize_t off = reinterpret_cast<PyMemberDescrObject*>(d)->d_member->offset;
    Py_DECREF(d);
    return off;
}

// is ``o``'s attribute ``name`` truthy (-1: error)
inline int attr_true(PyObject* o, PyObject* name) {
    PyObject* v = PyObject_GetAttr(o, name);
    if (v == nullptr) return -1;
    int r = PyObject_IsTrue(v);
    Py_DECREF(v);
    return r;
}

// is ``o``'s attribute ``name`` None (-1: error)
inline int attr_none(PyObject* o, PyObject* name) {
    PyObject* v = PyObject_GetAttr(o, name);
    if (v == nullptr) return -1;
    int r = v == Py_None;
    Py_DECREF(v);
    return r;
}

// a floating dtype (float16/32/64, bfloat16): identity with the known dtype objects, else
// its kind (-1: error)
int is_float_dtype(PyObject* dtype) {
    Py_ssize_t n = PyTuple_GET_SIZE(S.float_dtypes);
    for (Py_ssize_t i = 0; i < n; ++i)
        if (PyTuple_GET_ITEM(S.float_dtypes, i) == dtype) return 1;
    PyObject* kind = PyObject_GetAttr(dtype, s_kind);
    if (kind == nullptr) return -1;
    int r = PyUnicode_Compare(kind, s_f) == 0;
    Py_DECREF(kind);
    if (r) return 1;
    // bfloat16 from ml_dtypes is kind 'V': equal to one of the known ones by value
    for (Py_ssize_t i = 0; i < n; ++i) {
        int eq = PyObject_RichCompareBool(dtype, PyTuple_GET_ITEM(S.float_dtypes, i), Py_EQ);
        if (eq != 0) return eq;
    }
    return 0;
}

PyObject* fallback(PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
    // the Python apply(op, tensors, params)
    PyObject* tensors = tuple_of(args + 1, nargs - 1);
    if (tensors == nullptr) return nullptr;
    PyObject* params = PyDict_New();
    if (params == nullptr) {
        Py_DECREF(tensors);
        return nullptr;
    }
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nkw; ++i) {
        if (PyDict_SetItem(params, PyTuple_GET_ITEM(kwnames, i), args[nargs + i]) < 0) {
            Py_DECREF(tensors);
            Py_DECREF(params);
            return nullptr;
        }
    }
    PyObject* apply = PyObject_GetAttr(S.ops_mod, s_apply);
    PyObject* out = apply ? PyObject_CallFunctionObjArgs(apply, args[0], tensors, params, nullptr)
                          : nullptr;
    Py_XDECREF(apply);
    Py_DECREF(tensors);
    Py_DECREF(params);
    return out;
}

PyObject* new_tensor(PyObject* array, PyObject* device) {
    PyObject* t = S.tensor->tp_alloc(S.tensor, 0);
    if (t == nullptr) return nullptr;
    PyObject* version = PyList_New(1);
    if (version == nullptr) {
        Py_DECREF(t);
        return nullptr;
    }
    Py_INCREF(S.zero);
    PyList_SET_ITEM(version, 0, S.zero);
    put_b(t, S.t.array, array);
    put_b(t, S.t.device, device);
    put_b(t, S.t.requires_grad, Py_False);
    put_b(t, S.t.grad, Py_None);
    put_b(t, S.t.grad_fn, Py_None);
    put_b(t, S.t.output_nr, S.zero);
    put(t, S.t.version, version);
    put_b(t, S.t.base, Py_None);
    put_b(t, S.t.base_fn, Py_None);
    put_b(t, S.t.hooks, Py_None);
    put_b(t, S.t.retains_grad, Py_False);
    return t;
}

// SavedTensor(array, device, tensor=t, grad_fn=gf, output_nr=nr, owner=owner): its __init__
// (autograd/graph.py), for a tensor that is an input (gf None, nr 0, owner None) or output
PyObject* new_saved(PyObject* t, PyObject* gf, PyObject* nr, PyObject* owner) {
    PyObject* s = S.saved->tp_alloc(S.saved, 0);
    if (s == nullptr) return nullptr;
    put_b(s, S.s.array, slot(t, S.t.array));
    put_b(s, S.s.device, slot(t, S.t.device));
    put_b(s, S.s.leaf, Py_None);
    PyObject* version = slot(t, S.t.version);
    put_b(s, S.s.version, version);
    if (!PyList_Check(version) || PyList_GET_SIZE(version) < 1) {
        Py_DECREF(s);
        PyErr_SetString(PyExc_RuntimeError, "dispatch: a tensor's version counter is broken");
        return nullptr;
    }
    put_b(s, S.s.saved_version, PyList_GET_ITEM(version, 0));
    PyObject* t_gf = slot(t, S.t.grad_fn);
    bool t_rg = slot(t, S.t.requires_grad) == Py_True;
    PyObject* grad_fn = gf;
    PyObject* out_nr = nr;
    if (t_gf == Py_None && t_rg) {
        put_b(s, S.s.leaf, t);
    } else if (gf == Py_None) {
        grad_fn = t_gf;
        out_nr = slot(t, S.t.output_nr);
    }
    bool leaf = slot(s, S.s.leaf) != Py_None;
    put_b(s, S.s.output_nr, out_nr);
    put_b(s, S.s.requires_grad, (grad_fn != Py_None || leaf) ? Py_True : Py_False);
    bool weak = owner != Py_None && grad_fn == owner;
    put_b(s, S.s.weak, weak ? Py_True : Py_False);
    if (weak) {
        PyObject* ref = PyWeakref_NewRef(owner, nullptr);
        if (ref == nullptr) {
            Py_DECREF(s);
            return nullptr;
        }
        put(s, S.s.grad_fn, ref);
    } else {
        put_b(s, S.s.grad_fn, grad_fn);
    }
    return s;
}

inline bool holds(PyObject* v, PyObject* t) {
    return v == t || v == slot(t, S.t.array);
}

// the SavedTensor for ``v``, something a forward saved: an input's or an output's (found by
// identity: the Tensor or its array), else the Python _save (a constant). New ref or NULL.
PyObject* save_one(PyObject* v, PyObject* const* tensors, Py_ssize_t n, PyObject* results,
                   PyObject* node) {
    if (v == Py_None) {
        Py_INCREF(Py_None);
        return Py_None;
    }
    for (Py_ssize_t i = 0; i < n; ++i)
        if (tensors[i] != Py_None && holds(v, tensors[i]))
            return new_saved(tensors[i], Py_None, S.zero, Py_None);
    Py_ssize_t nout = PyList_GET_SIZE(results);
    for (Py_ssize_t i = 0; i < nout; ++i) {
        PyObject* r = PyList_GET_ITEM(results, i);
        if (holds(v, r)) {
            Ref nr(PyLong_FromSsize_t(i));
            return nr ? new_saved(r, slot(r, S.t.grad_fn), nr.get(), node) : nullptr;
        }
    }
    Ref save(PyObject_GetAttr(S.function_mod, s_save));
    Ref ins(save ? tuple_of(tensors, n) : nullptr);
    return ins ? PyObject_CallFunctionObjArgs(save.get(), v, ins.get(), results, node, S.empty,
                                              nullptr)
               : nullptr;
}

// record() of autograd/function.py for a context with no non-differentiable outputs and no
// dirty inputs. Returns 0, or -1 with an exception set.
int record_fast(PyObject* bw, PyObject* bwa, PyObject* ctx, PyObject* const* tensors,
                Py_ssize_t n, PyObject* results) {
    Py_ssize_t nout = PyList_GET_SIZE(results);
    // ctx.input_meta = [None | (shape, dtype)]
    Ref meta(PyList_New(n));
    if (!meta) return -1;
    for (Py_ssize_t i = 0; i < n; ++i) {
        PyObject* m = Py_None;
        if (tensors[i] == Py_None)
            Py_INCREF(m);
        else if ((m = meta_of(slot(tensors[i], S.t.array))) == nullptr)
            return -1;
        PyList_SET_ITEM(meta.get(), i, m);
    }
    put(ctx, S.c.input_meta, meta.release());

    // the Node (autograd/graph.py Node.__init__); the outputs hold it once recorded
    Ref node(S.node->tp_alloc(S.node, 0));
    Ref name(node ? get_slot(ctx, S.c.op_name, s_op_name) : nullptr);
    Ref seq(name ? PyIter_Next(S.seq) : nullptr);
    if (!seq) {
        if (name && !PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "dispatch: the node counter ended");
        return -1;
    }
    Ref next(PyList_New(n)), out_meta(PyList_New(nout)), n_out(PyLong_FromSsize_t(nout));
    if (!next || !out_meta || !n_out) return -1;
    for (Py_ssize_t i = 0; i < n; ++i) {   // where each input's gradient goes
        PyObject* t = tensors[i];
        PyObject* e = Py_None;
        if (t != Py_None && slot(t, S.t.requires_grad) == Py_True)
            e = slot(t, S.t.grad_fn) == Py_None ? t   // the leaf itself
                                                 : PyTuple_Pack(2, slot(t, S.t.grad_fn),
                                                                slot(t, S.t.output_nr));
        if (e == nullptr) return -1;
        if (e == Py_None || e == t) Py_INCREF(e);
        PyList_SET_ITEM(next.get(), i, e);
    }
    for (Py_ssize_t i = 0; i < nout; ++i) {
        PyObject* r = PyList_GET_ITEM(results, i);
        PyObject* m = meta_of(slot(r, S.t.array), slot(r, S.t.device));
        if (m == nullptr) return -1;
        PyList_SET_ITEM(out_meta.get(), i, m);
        int fl = is_float_dtype(PyTuple_GET_ITEM(m, 1));
        if (fl < 0) return -1;
        if (fl) {   // a differentiable output: its grad_fn is this node
            PyObject* nr = PyLong_FromSsize_t(i);
            if (nr == nullptr) return -1;
            put_b(r, S.t.grad_fn, node.get());
            put(r, S.t.output_nr, nr);
            put_b(r, S.t.requires_grad, Py_True);
        }
    }
    PyObject* nd = node.get();
    put(nd, S.n.name, name.release());
    put(nd, S.n.seq, seq.release());
    put_b(nd, S.n.backward_fn, bw);
    put_b(nd, S.n.backward_arrays, bwa);
    put_b(nd, S.n.ctx, ctx);
    put(nd, S.n.next, next.release());
    put(nd, S.n.n_outputs, n_out.release());
    put(nd, S.n.out_meta, out_meta.release());
    put_b(nd, S.n.pre_hooks, Py_None);
    put_b(nd, S.n.freed, Py_False);

    // ctx._saved: what the forward saved, resolved against the inputs and outputs
    Ref to_save(get_slot(ctx, S.c.to_save, s_to_save));
    if (!to_save) return -1;
    if (!PyTuple_Check(to_save.get())) {
        PyErr_SetString(PyExc_TypeError, "dispatch: ctx._to_save is not a tuple");
        return -1;
    }
    Py_ssize_t ns = PyTuple_GET_SIZE(to_save.get());
    Ref saved(PyTuple_New(ns));
    if (!saved) return -1;
    for (Py_ssize_t k = 0; k < ns; ++k) {
        PyObject* sv = save_one(PyTuple_GET_ITEM(to_save.get(), k), tensors, n, results, nd);
        if (sv == nullptr) return -1;
        PyTuple_SET_ITEM(saved.get(), k, sv);
    }
    put(ctx, S.c.saved, saved.release());
    put_b(ctx, S.c.to_save, S.empty);
    return 0;
}

inline long long now_ns() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return static_cast<long long>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

// listener.op_begin(op.name, tensors) (-1: error)
int report_begin(PyObject* listener, PyObject* op, PyObject* const* tensors, Py_ssize_t n) {
    PyObject* name = PyObject_GetAttr(op, s_name);
    PyObject* ts = name ? PyTuple_New(n) : nullptr;
    if (ts == nullptr) {
        Py_XDECREF(name);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; ++i) {
        Py_INCREF(tensors[i]);
        PyTuple_SET_ITEM(ts, i, tensors[i]);
    }
    PyObject* r = PyObject_CallMethodObjArgs(listener, s_op_begin, name, ts, nullptr);
    Py_DECREF(name);
    Py_DECREF(ts);
    Py_XDECREF(r);
    return r ? 0 : -1;
}

// listener.op(op.name, dev, t0, f0, f1, now, [shapes]) (-1: error)
int report_op(PyObject* listener, PyObject* op, PyObject* dev, long long t0, long long f0,
              long long f1, PyObject* const* tensors, Py_ssize_t n) {
    PyObject* shapes = PyList_New(n);
    if (shapes == nullptr) return -1;
    for (Py_ssize_t i = 0; i < n; ++i) {
        PyObject* sh = Py_None;
        if (tensors[i] == Py_None) {
            Py_INCREF(sh);
        } else if ((sh = PyObject_GetAttr(slot(tensors[i], S.t.array), s_shape)) == nullptr) {
            Py_DECREF(shapes);
            return -1;
        }
        PyList_SET_ITEM(shapes, i, sh);
    }
    PyObject* name = PyObject_GetAttr(op, s_name);
    PyObject* r = name ? PyObject_CallMethod(listener, "op", "OOLLLLO", name, dev, t0, f0, f1,
                                             now_ns(), shapes)
                       : nullptr;
    Py_XDECREF(name);
    Py_DECREF(shapes);
    Py_XDECREF(r);
    return r ? 0 : -1;
}

// What apply reads from an op class on every call, cached per class and valid while the
// class's type-attribute version tag is unchanged (CPython resets the tag when the class or
// a base is modified: a monkeypatched forward is seen at once).
struct OpInfo {
    unsigned int tag = 0;
    bool view = false, differentiable = true;
    PyObject *name = nullptr, *forward = nullptr, *inner = nullptr, *backward = nullptr,
             *backward_arrays = nullptr;   // owned; inner: forward.lowp_inner or NULL
    void clear() {
        Py_CLEAR(name);
        Py_CLEAR(forward);
        Py_CLEAR(inner);
        Py_CLEAR(backward);
        Py_CLEAR(backward_arrays);
        tag = 0;
    }
};
std::unordered_map<PyObject*, OpInfo> op_cache;   // op classes are kept alive by REGISTRY
PyObject* s_lowp_inner;

const OpInfo* op_info(PyObject* op) {
    PyTypeObject* type = reinterpret_cast<PyTypeObject*>(op);
    if (!PyType_Check(op)) {
        PyErr_SetString(PyExc_TypeError, "apply: op must be an Op class");
        return nullptr;
    }
    OpInfo& info = op_cache[op];
    if (info.tag != 0 && info.tag == type->tp_version_tag &&
        PyType_HasFeature(type, Py_TPFLAGS_VALID_VERSION_TAG))
        return &info;
    info.clear();
    int view = attr_true(op, s_view);
    int diff = view < 0 ? -1 : attr_true(op, s_differentiable);
    if (diff < 0) return nullptr;
    info.view = view;
    info.differentiable = diff;
    info.name = PyObject_GetAttr(op, s_name);
    info.forward = info.name ? PyObject_GetAttr(op, s_forward) : nullptr;
    info.backward = info.forward ? PyObject_GetAttr(op, s_backward) : nullptr;
    info.backward_arrays = info.backward ? PyObject_GetAttr(op, s_backward_arrays) : nullptr;
    if (info.backward_arrays == nullptr) {
        info.clear();
        return nullptr;
    }
    info.inner = PyObject_GetAttr(info.forward, s_lowp_inner);
    if (info.inner == nullptr) PyErr_Clear();
    // the lookups above gave the class a version tag (0: none could be given: no caching)
    info.tag = PyType_HasFeature(type, Py_TPFLAGS_VALID_VERSION_TAG) ? type->tp_version_tag : 0;
    return &info;
}

constexpr Py_ssize_t MAX_ARGS = 16;

PyObject* apply(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "apply(op, *tensors, **params)");
        return nullptr;
    }
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    Py_ssize_t n = nargs - 1;
    if (!S.ready || n == 0 || n + nkw + 1 > MAX_ARGS) return fallback(args, nargs, kwnames);
    PyObject* op = args[0];
    PyObject* const* tensors = args + 1;
    int r;
    // the modes the Python path handles: autocast, capture, a profiler, anomaly detection
    PyObject* cur = PyObject_GetAttr(S.ops_mod, s_apply);
    if (cur == nullptr) return nullptr;
    Py_DECREF(cur);
    if (cur != S.py_apply) return fallback(args, nargs, kwnames);
    if ((r = attr_none(S.autocast_mod, s_state)) != 1 ||
        (r = attr_none(S.capture_mod, s_active)) != 1 ||
        (r = attr_true(S.grad_state, s_anomaly)) != 0)
        return r < 0 ? nullptr : fallback(args, nargs, kwnames);
    struct Owned {   // a reference released on every way out
        PyObject* p;
        ~Owned() { Py_XDECREF(p); }
    } hold{PyObject_GetAttr(S.events_mod, s_listener)};
    if (hold.p == nullptr) return nullptr;
    PyObject* listener = hold.p == Py_None ? nullptr : hold.p;   // a profiler, as in Python
    // one Device object for every tensor, on the host
    PyObject* dev = nullptr;
    bool any_needs = false;
    for (Py_ssize_t i = 0; i < n; ++i) {
        PyObject* t = tensors[i];
        if (t == Py_None) continue;
        if (!PyObject_TypeCheck(t, S.tensor)) return fallback(args, nargs, kwnames);
        PyObject* d = slot(t, S.t.device);
        PyObject* rg = slot(t, S.t.requires_grad);
        if (d == nullptr || rg == nullptr || slot(t, S.t.array) == nullptr ||
            (dev != nullptr && d != dev))
            return fallback(args, nargs, kwnames);
        dev = d;
        any_needs |= rg == Py_True;
    }
    if (dev == nullptr) return fallback(args, nargs, kwnames);
    if (dev != S.host_dev) {   // Device.host is a property: asked once per Device object
        if ((r = attr_true(dev, s_host)) != 1) return r < 0 ? nullptr : fallback(args, nargs, kwnames);
        Py_INCREF(dev);
        Py_XSETREF(S.host_dev, dev);
    }
    const OpInfo* info = op_info(op);
    if (info == nullptr) return nullptr;
    if (info->view) return fallback(args, nargs, kwnames);
    // held for this call: the forward may change the op class (the cache entry is refreshed)
    Py_INCREF(info->backward);
    Py_INCREF(info->backward_arrays);
    Ref backward(info->backward), backward_arrays(info->backward_arrays);
    long long t0 = 0, f0 = 0, f1 = 0;
    if (listener != nullptr) {
        t0 = now_ns();
        if (report_begin(listener, op, tensors, n) < 0) return nullptr;
    }
    int enabled = attr_true(S.grad_state, s_enabled);
    if (enabled < 0) return nullptr;
    bool recording = info->differentiable && any_needs && enabled;
    if (recording) {   // ops._check_views: a stale view raises there
        for (Py_ssize_t i = 0; i < n; ++i) {
            PyObject* t = tensors[i];
            if (t == Py_None) continue;
            PyObject* base = slot(t, S.t.base);
            if (base != nullptr && base != Py_None && slot(t, S.t.requires_grad) == Py_True &&
                slot(base, S.t.grad_fn) != slot(t, S.t.base_fn))
                return fallback(args, nargs, kwnames);
        }
    }

    // ctx = FunctionCtx(needs_grad, dev, op.name); ctx.op = op
    PyObject* needs = PyTuple_New(n);
    if (needs == nullptr) return nullptr;
    for (Py_ssize_t i = 0; i < n; ++i) {
        PyObject* t = tensors[i];
        PyObject* b = (t != Py_None && slot(t, S.t.requires_grad) == Py_True) ? Py_True
                                                                               : Py_False;
        Py_INCREF(b);
        PyTuple_SET_ITEM(needs, i, b);
    }
    PyObject* ctx = S.ctx->tp_new(S.ctx, S.empty, nullptr);
    if (ctx == nullptr) {
        Py_DECREF(needs);
        return nullptr;
    }
    PyObject* name = info->name;
    Py_INCREF(name);
    // FunctionCtx.__init__ (autograd/function.py), slot by slot
    put(ctx, S.c.needs_input_grad, needs);
    put_b(ctx, S.c.device, dev);
    put(ctx, S.c.op_name, name);
    put_b(ctx, S.c.op, op);
    put_b(ctx, S.c.materialize_grads, Py_True);
    put_b(ctx, S.c.input_meta, S.empty);
    put_b(ctx, S.c.out_device, Py_None);
    put_b(ctx, S.c.to_save, S.empty);
    put_b(ctx, S.c.saved, Py_None);
    put_b(ctx, S.c.non_diff, S.empty);
    put_b(ctx, S.c.dirty, S.empty);

    // out = op.forward(ctx, *arrays, **params)
    PyObject* argv[MAX_ARGS + 1];
    argv[0] = ctx;
    for (Py_ssize_t i = 0; i < n; ++i)
        argv[1 + i] = tensors[i] == Py_None ? Py_None : slot(tensors[i], S.t.array);
    for (Py_ssize_t i = 0; i < nkw; ++i) argv[1 + n + i] = args[nargs + i];
    // a float16/bfloat16-aware forward (ops/lowp.py) calls its inner forward when no array
    // is float16 or bfloat16: so do we, without the wrapper's Python
    PyObject* forward = info->forward;
    if (info->inner != nullptr) {
        forward = info->inner;
        for (Py_ssize_t i = 0; i < n; ++i) {
            if (argv[1 + i] == Py_None) continue;
            PyObject* dt = PyObject_GetAttr(argv[1 + i], s_dtype);
            if (dt == nullptr) {
                Py_DECREF(ctx);
                return nullptr;
            }
            bool plain = PyTuple_GET_ITEM(S.float_dtypes, 0) == dt ||
                         PyTuple_GET_ITEM(S.float_dtypes, 1) == dt;
            int low = plain ? 0 : PySequence_Contains(S.low_dtypes, dt);
            Py_DECREF(dt);
            if (low < 0) {
                Py_DECREF(ctx);
                return nullptr;
            }
            if (low) {
                forward = info->forward;
                break;
            }
        }
    }
    Py_INCREF(forward);          // (a forward may modify the op class: keep it alive)
    if (listener != nullptr) f0 = now_ns();
    PyObject* out = PyObject_Vectorcall(forward, argv, 1 + n, kwnames);
    if (listener != nullptr) f1 = now_ns();
    Py_DECREF(forward);
    if (out == nullptr) {
        Py_DECREF(ctx);
        return nullptr;
    }
    bool multi = PyTuple_Check(out);
    PyObject* outs = multi ? out : PyTuple_Pack(1, out);
    if (!multi) Py_DECREF(out);
    PyObject* results = nullptr;
    PyObject* out_dev = nullptr;
    PyObject* ret = nullptr;
    if (outs == nullptr) goto done;
    {
        Py_ssize_t nout = PyTuple_GET_SIZE(outs);
        bool plain = true;
        for (Py_ssize_t i = 0; i < nout; ++i)
            plain &= Py_TYPE(PyTuple_GET_ITEM(outs, i)) ==
                     reinterpret_cast<PyTypeObject*>(S.ndarray);
        if (!plain) {   // 0-d results that NumPy made scalars: ops._as_ndarrays
            PyObject* fix = PyObject_GetAttr(S.ops_mod, s_as_ndarrays);
            PyObject* fixed = fix ? PyObject_CallFunctionObjArgs(fix, ctx, outs, nullptr)
                                  : nullptr;
            Py_XDECREF(fix);
            if (fixed == nullptr) goto done;
            Py_DECREF(outs);
            outs = fixed;
        }
        out_dev = get_slot(ctx, S.c.out_device, s_out_device);
        if (out_dev == nullptr) goto done;
        if (out_dev == Py_None) {
            Py_DECREF(out_dev);
            Py_INCREF(dev);
            out_dev = dev;
        }
        PyObject* type = PyObject_GetAttr(out_dev, s_type);
        if (type == nullptr) goto done;
        int cuda = PyUnicode_Compare(type, s_cuda) == 0;
        Py_DECREF(type);
        if (cuda) {   // the emulated device: the arrays join its memory pool
            PyObject* own = PyObject_CallFunctionObjArgs(S.emulated_own, outs, nullptr);
            if (own == nullptr) goto done;
            Py_DECREF(own);
        }
        results = PyList_New(nout);
        if (results == nullptr) goto done;
        for (Py_ssize_t i = 0; i < nout; ++i) {
            PyObject* t = new_tensor(PyTuple_GET_ITEM(outs, i), out_dev);
            if (t == nullptr) goto done;
            PyList_SET_ITEM(results, i, t);
        }
        if (recording) {
            PyObject* nd = get_slot(ctx, S.c.non_diff, s_non_diff);
            PyObject* dirty = nd ? get_slot(ctx, S.c.dirty, s_dirty) : nullptr;
            if (dirty == nullptr) {
                Py_XDECREF(nd);
                goto done;
            }
            int special = PyObject_IsTrue(nd) || PyObject_IsTrue(dirty);
            Py_DECREF(nd);
            Py_DECREF(dirty);
            if (special) {   // the Python record
                Ref rec(PyObject_GetAttr(S.function_mod, s_record));
                Ref ins(rec ? tuple_of(tensors, n) : nullptr);
                Ref node(ins ? PyObject_CallFunctionObjArgs(rec.get(), ctx, backward.get(),
                                                            ins.get(), results,
                                                            backward_arrays.get(), nullptr)
                             : nullptr);
                if (!node) goto done;
            } else if (record_fast(backward.get(), backward_arrays.get(), ctx, tensors, n,
                                   results) < 0) {
                goto done;
            }
        }
        put_b(ctx, S.c.to_save, S.empty);
        if (listener != nullptr && report_op(listener, op, dev, t0, f0, f1, tensors, n) < 0)
            goto done;
        if (multi) {
            ret = PyList_AsTuple(results);
        } else {
            ret = PyList_GET_ITEM(results, 0);
            Py_INCREF(ret);
        }
    }
done:
    Py_XDECREF(results);
    Py_XDECREF(outs);
    Py_XDECREF(out_dev);
    Py_DECREF(ctx);
    return ret;
}

PyMethodDef apply_def = {"apply", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(apply)),
                         METH_FASTCALL | METH_KEYWORDS,
                         "apply(op, *tensors, **params): gpudiff.ops.apply's fast path "
                         "(csrc/cpu/dispatch.cpp)"};

PyObject* intern(const char* s) {
    PyObject* o = PyUnicode_InternFromString(s);
    if (o == nullptr) throw py::error_already_set();
    return o;
}

void dispatch_init(py::dict cfg) {
    auto get = [&](const char* k) {
        PyObject* o = cfg[k].ptr();
        Py_INCREF(o);
        return o;
    };
    S.tensor = reinterpret_cast<PyTypeObject*>(get("Tensor"));
    S.node = reinterpret_cast<PyTypeObject*>(get("Node"));
    S.saved = reinterpret_cast<PyTypeObject*>(get("SavedTensor"));
    S.ctx = reinterpret_cast<PyTypeObject*>(get("FunctionCtx"));
    S.ndarray = get("ndarray");
    S.grad_state = get("grad_state");
    S.autocast_mod = get("autocast");
    S.capture_mod = get("capture");
    S.events_mod = get("events");
    S.ops_mod = get("ops");
    S.py_apply = get("apply");
    S.function_mod = get("function");
    S.emulated_own = get("emulated_own");
    S.seq = get("seq");
    S.float_dtypes = get("float_dtypes");
    S.low_dtypes = get("low_dtypes");
    S.empty = PyTuple_New(0);
    S.zero = PyLong_FromLong(0);
    S.t = {member_offset(S.tensor, "array"),     member_offset(S.tensor, "device"),
           member_offset(S.tensor, "_requires_grad"), member_offset(S.tensor, "grad"),
           member_offset(S.tensor, "grad_fn"),   member_offset(S.tensor, "_output_nr"),
           member_offset(S.tensor, "_version"),  member_offset(S.tensor, "_hooks"),
           member_offset(S.tensor, "_retains_grad"), member_offset(S.tensor, "_base"),
           member_offset(S.tensor, "_base_fn")};
    S.n = {member_offset(S.node, "name"),        member_offset(S.node, "seq"),
           member_offset(S.node, "next"),        member_offset(S.node, "ctx"),
           member_offset(S.node, "backward_fn"), member_offset(S.node, "backward_arrays"),
           member_offset(S.node, "n_outputs"),   member_offset(S.node, "out_meta"),
           member_offset(S.node, "pre_hooks"),   member_offset(S.node, "freed")};
    S.s = {member_offset(S.saved, "array"),         member_offset(S.saved, "version"),
           member_offset(S.saved, "saved_version"), member_offset(S.saved, "leaf"),
           member_offset(S.saved, "grad_fn"),       member_offset(S.saved, "output_nr"),
           member_offset(S.saved, "requires_grad"), member_offset(S.saved, "device"),
           member_offset(S.saved, "weak")};
    S.c = {member_offset(S.ctx, "needs_input_grad"), member_offset(S.ctx, "device"),
           member_offset(S.ctx, "op_name"),          member_offset(S.ctx, "op"),
           member_offset(S.ctx, "materialize_grads"), member_offset(S.ctx, "input_meta"),
           member_offset(S.ctx, "out_device"),       member_offset(S.ctx, "_to_save"),
           member_offset(S.ctx, "_saved"),           member_offset(S.ctx, "_non_diff"),
           member_offset(S.ctx, "_dirty")};
    s_state = intern("state");
    s_active = intern("active");
    s_listener = intern("listener");
    s_enabled = intern("enabled");
    s_anomaly = intern("anomaly");
    s_host = intern("host");
    s_type = intern("type");
    s_cuda = intern("cuda");
    s_differentiable = intern("differentiable");
    s_view = intern("view");
    s_forward = intern("forward");
    s_backward = intern("backward");
    s_backward_arrays = intern("backward_arrays");
    s_name = intern("name");
    s_needs_input_grad = intern("needs_input_grad");
    s_device = intern("device");
    s_op_name = intern("op_name");
    s_op = intern("op");
    s_out_device = intern("out_device");
    s_to_save = intern("_to_save");
    s_non_diff = intern("_non_diff");
    s_dirty = intern("_dirty");
    s_saved = intern("_saved");
    s_input_meta = intern("input_meta");
    s_shape = intern("shape");
    s_dtype = intern("dtype");
    s_kind = intern("kind");
    s_apply = intern("apply");
    s_record = intern("record");
    s_save = intern("_save");
    s_as_ndarrays = intern("_as_ndarrays");
    s_f = intern("f");
    s_op_begin = intern("op_begin");
    s_lowp_inner = intern("lowp_inner");
    S.ready = true;
}

}  // namespace

void bind_dispatch(py::module_& m) {
    m.def("dispatch_init", &dispatch_init, py::arg("config"),
          "Hand the fast apply the classes and modules it works with (ops/__init__.py)");
    PyObject* f = PyCFunction_NewEx(&apply_def, nullptr, m.attr("__name__").ptr());
    if (f == nullptr) throw py::error_already_set();
    m.add_object("apply", py::reinterpret_steal<py::object>(f));
}
