"""Op database entries for gpudiff.nn.functional: activations, losses, linear, layer_norm,
one_hot, pad modes. Format: tests/opdb/__init__.py."""

from . import LOW, Const, OpInfo, S, float32, float64, int64

FL = (float64, float32) + LOW   # float16 / bfloat16 too


def F(m):
    return m.nn.functional


def act_samples(make, **kw):
    return [S(make(3, 4, **kw)), S(make(**kw)), S(make(2, 3, 4, noncontig=True, **kw))]


def _act(name, call, covers, kinks=(), gg=True, **kw):
    return OpInfo(name, op=call, covers=covers, gradgradcheck=gg,
                  samples=lambda make: act_samples(make, avoid=kinks), **kw)


ACTIVATIONS = [
    _act("F.relu", lambda m, x: F(m).relu(x), ("relu", "relu_backward"), kinks=(0.0,),
         kernels=("relu", "relu_backward"), dtypes=FL),
    _act("F.relu6", lambda m, x: F(m).relu6(x * 4), ("clamp", "mul"), kinks=(0.0, 1.5)),
    _act("F.leaky_relu", lambda m, x: F(m).leaky_relu(x, 0.1),
         ("leaky_relu", "leaky_relu_backward"), kinks=(0.0,),
         kernels=("leaky_relu", "leaky_relu_backward"), dtypes=FL),
    _act("F.leaky_relu_default", lambda m, x: F(m).leaky_relu(x), ("leaky_relu",),
         kinks=(0.0,), kernels=("leaky_relu", "leaky_relu_backward")),
    _act("F.elu", lambda m, x: F(m).elu(x, alpha=0.7), ("elu",), kinks=(0.0,)),
    _act("F.gelu", lambda m, x: F(m).gelu(x), ("erf", "mul", "add")),
    _act("F.gelu_tanh", lambda m, x: F(m).gelu(x, approximate="tanh"), ("tanh", "pow_scalar")),
    _act("F.silu", lambda m, x: F(m).silu(x), ("sigmoid", "mul")),
    OpInfo("F.softplus", op=lambda m, x, **kw: F(m).softplus(x, **kw), covers=("softplus",),
           gradgradcheck=True,
           samples=lambda make: [S(make(3, 4)), S(make(3, 4), beta=2.0),
                                 S(make(3, 4) * 10, beta=1.5, threshold=5.0,
                                   skip=("gradcheck", "gradgradcheck")),  # linear part
                                 S(make())]),
    _act("F.hardtanh", lambda m, x: F(m).hardtanh(x, -0.5, 0.8), ("clamp",),
         kinks=(-0.5, 0.8)),
    _act("F.sigmoid", lambda m, x: F(m).sigmoid(x), ("sigmoid", "sigmoid_backward"),
         kernels=("sigmoid", "sigmoid_backward")),
    _act("F.tanh", lambda m, x: F(m).tanh(x), ("tanh", "tanh_backward"),
         kernels=("tanh", "tanh_backward")),
    _act("F.logsigmoid", lambda m, x: F(m).logsigmoid(x), ("softplus", "neg")),
    # inplace=True on a non-leaf (x * 1.0): the graph must stay correct
    _act("F.inplace", lambda m, x: [getattr(F(m), f)(x * 1.0, inplace=True) for f in
                                    ("relu", "leaky_relu", "elu", "hardtanh", "relu6", "silu")],
         ("relu", "leaky_relu", "elu", "clamp", "sigmoid"), kinks=(0.0, 1.0, -1.0)),
    OpInfo("F.softmax", dtypes=FL, op=lambda m, x, d: F(m).softmax(x, d), covers=("softmax",),
           kernels=("softmax", "softmax_backward"),
           samples=lambda make: [S(make(3, 4), 1), S(make(2, 3, 4), -1)]),
    OpInfo("F.log_softmax", dtypes=FL, op=lambda m, x, d: F(m).log_softmax(x, dim=d),
           covers=("log_softmax",), kernels=("log_softmax", "log_softmax_backward"),
           samples=lambda make: [S(make(3, 4), 1), S(make(2, 3, 4), 0)]),
    OpInfo("F.softmin", op=lambda m, x: F(m).softmin(x, 1), covers=("softmax", "neg"),
           samples=lambda make: [S(make(3, 4))]),
]


# ---- linear, layer_norm, pad, one_hot -------------------------------------------------
LAYERS = [
    OpInfo("F.linear", dtypes=FL, op=lambda m, x, w, *b: F(m).linear(x, w, *b),
           covers=("linear",), gradgradcheck=True,
           samples=lambda make: [S(make(3, 4), make(5, 4), make(5)), S(make(3, 4), make(2, 4)),
                                 S(make(2, 3, 4), make(5, 4), make(5)), S(make(4), make(2, 4))]),
    OpInfo("F.layer_norm", op=lambda m, x, s, *wb, **kw: F(m).layer_norm(x, s, *wb, **kw),
           covers=("mean", "rsqrt", "sub", "mul"), gradgradcheck=True,
           tol={float32: (1e-4, 1e-4)},
           samples=lambda make: [S(make(3, 5), (5,)), S(make(2, 3, 4), (3, 4),
                                                        make(3, 4), make(3, 4)),
                                 S(make(2, 3, 4), [4], make(4), make(4), eps=1e-3),
                                 S(make(4, 6, noncontig=True), [6])]),
    OpInfo("F.pad_modes", op=lambda m, x, p, mode: F(m).pad(x, p, mode=mode),
           covers=("getitem",), gradgradcheck=True,
           samples=lambda make: [S(make(1, 2, 5), (2, 1), "reflect"),
                                 S(make(1, 2, 4), (1, 3), "replicate"),
                                 S(make(1, 2, 3), (2, 2), "circular"),
                                 S(make(1, 2, 3, 4), (1, 1, 2, 0), "reflect"),
                                 S(make(1, 1, 3, 3), (1, 2, 1, 0), "replicate")]),
    OpInfo("F.one_hot", op=lambda m, t, *n: F(m).one_hot(t, *n), covers=(), grad=False,
           dtypes=(int64,),
           samples=lambda make: [S(make.index(5, 4)), S(make.index((2, 3), 3), 5),
                                 S(make.index((), 3), 3)]),
    OpInfo("F.normalize", op=lambda m, x, **kw: F(m).normalize(x, **kw),
           covers=("abs", "pow_scalar", "sum", "clamp", "div"),
           samples=lambda make: [S(make(3, 4, avoid=(0,))), S(make(3, 4, avoid=(0,)), dim=0)]),
    OpInfo("F.cosine_similarity", op=lambda m, a, b: F(m).cosine_similarity(a, b),
           covers=("sqrt", "clamp", "div"), samples=lambda make: [S(make(3, 4), make(3, 4))]),
]


# ---- losses ---------------------------------------------------------------------------
REDUCTIONS = ("mean", "sum", "none")


def _regression(make):
    out = [S(make(3, 4), make(3, 4), reduction=r) for r in REDUCTIONS]
    out.append(S(make(5), Const(make(5))))                        # target not differentiated
    out.append(S(make(), make()))
    return out


def _ce_samples(make):
    w = Const(make(5, low=0.2, high=2.0))
    t = make.index(4, 5)
    t_ign = t.copy()
    t_ign[1] = -100
    return [
        S(make(4, 5), t),
        S(make(4, 5), t, reduction="sum"), S(make(4, 5), t, reduction="none"),
        S(make(4, 5), t, weight=w),
        S(make(4, 5), t_ign, weight=w),                            # ignore_index -100
        S(make(4, 5), t, ignore_index=2),
        S(make(4, 5), t, label_smoothing=0.1),
        S(make(4, 5), t_ign, weight=w, label_smoothing=0.2, reduction="sum"),
        S(make(2, 5, 3, 2), make.index((2, 3, 2), 5)),             # N-d targets (N, d1, d2)
        S(make(2, 5, 3), make.index((2, 3), 5), reduction="none"),
        S(make(5), make.index((), 5)),                             # unbatched (C,)
        S(make(4, 5) * 200, t),                                    # huge logits: stable
        S(make(4, 5, noncontig=True), t),
    ]


def _ce_prob_samples(make):
    p = make(4, 5, low=0.0, high=1.0)
    p = Const((p / p.sum(1, keepdims=True)).astype(make.dtype))
    return [S(make(4, 5), p), S(make(4, 5), p, label_smoothing=0.1, reduction="sum"),
            S(make(4, 5), p, weight=Const(make(5, low=0.5, high=1.5)), reduction="none")]


def _nll_samples(make):
    t = make.index(4, 5)
    t_ign = t.copy()
    t_ign[0] = -100
    w = Const(make(5, low=0.2, high=2.0))
    return [S(make(4, 5), t), S(make(4, 5), t, reduction="sum"),
            S(make(4, 5), t_ign, weight=w), S(make(4, 5), t, ignore_index=1, reduction="none"),
            S(make(2, 5, 3), make.index((2, 3), 5)), S(make(5), make.index((), 5))]


def _bce_samples(make):
    p = {"low": 0.05, "high": 0.95}
    t = Const(make(3, 4, low=0.0, high=1.0))
    return [S(make(3, 4, **p), t), S(make(3, 4, **p), t, reduction="sum"),
            S(make(3, 4, **p), Const(make.mask(3, 4).astype(make.dtype)), reduction="none"),
            S(make(3, 4, **p), t, weight=Const(make(4, low=0.5, high=2.0)))]


def _bce_logits_samples(make):
    t = Const(make(3, 4, low=0.0, high=1.0))
    return [S(make(3, 4), t), S(make(3, 4), make(3, 4, low=0.0, high=1.0), reduction="sum"),
            S(make(3, 4), t, pos_weight=Const(make(4, low=0.5, high=3.0))),
            S(make(3, 4), t, weight=Const(make(3, 1, low=0.5, high=2.0)), reduction="none"),
            S(make(3, 4) * 100, t)]                                # no overflow


def _margin_samples(make):
    t = make.index(4, 5)
    return [S(make(4, 5), t), S(make(4, 5), t, p=2), S(make(4, 5), t, margin=0.5,
                                                        reduction="sum"),
            S(make(4, 5), t, weight=Const(make(5, low=0.5, high=2.0)), reduction="none"),
            S(make(5), make.index((), 5))]


def _kl_samples(make):
    logp = make(3, 4, low=-3.0, high=-0.1)
    q = make(3, 4, low=0.05, high=1.0)
    q0 = q.copy()
    q0[0, 1] = 0  # zero target probability: contributes 0
    return [S(logp, q, reduction="batchmean"), S(logp, Const(q0), reduction="sum"),
            S(logp, Const(q0), reduction="none"), S(logp, q),
            S(logp, make(3, 4, low=-3.0, high=-0.1), reduction="batchmean", log_target=True)]


LOSSES = [
    OpInfo("F.cross_entropy", dtypes=FL, op=lambda m, x, t, **kw: F(m).cross_entropy(x, t, **kw),
           covers=("cross_entropy",), kernels=("cross_entropy",), gradgradcheck=True,
           samples=_ce_samples),
    OpInfo("F.cross_entropy_probs", op=lambda m, x, t, **kw: F(m).cross_entropy(x, t, **kw),
           covers=("log_softmax",), gradgradcheck=True, samples=_ce_prob_samples),
    OpInfo("F.nll_loss", op=lambda m, x, t, **kw: F(m).nll_loss(x, t, **kw),
           covers=("gather", "getitem"), gradgradcheck=True, samples=_nll_samples),
    OpInfo("F.mse_loss", dtypes=FL, op=lambda m, a, b, **kw: F(m).mse_loss(a, b, **kw),
           covers=("sub", "mul", "mean"), gradgradcheck=True, samples=_regression),
    OpInfo("F.l1_loss", op=lambda m, a, b, **kw: F(m).l1_loss(a, b, **kw), covers=("abs",),
           samples=_regression),
    OpInfo("F.smooth_l1_loss", op=lambda m, a, b, **kw: F(m).smooth_l1_loss(a, b, **kw),
           covers=("where",), gradgradcheck=True,
           samples=lambda make: _regression(make) + [S(make(3, 4), make(3, 4), beta=0.5),
                                                     S(make(3, 4), make(3, 4), beta=0.0)]),
    OpInfo("F.huber_loss", op=lambda m, a, b, **kw: F(m).huber_loss(a, b, **kw),
           covers=("where",), gradgradcheck=True,
           samples=lambda make: _regression(make) + [S(make(3, 4), make(3, 4), delta=0.4)]),
    OpInfo("F.binary_cross_entropy",
           op=lambda m, x, t, **kw: F(m).binary_cross_entropy(x, t, **kw),
           covers=("log", "clamp"), gradgradcheck=True, samples=_bce_samples),
    OpInfo("F.binary_cross_entropy_with_logits",
           op=lambda m, x, t, **kw: F(m).binary_cross_entropy_with_logits(x, t, **kw),
           covers=("log1p", "exp", "abs"), samples=_bce_logits_samples),
    OpInfo("F.multi_margin_loss", op=lambda m, x, t, **kw: F(m).multi_margin_loss(x, t, **kw),
           covers=("gather", "clamp"), samples=_margin_samples),
    OpInfo("F.kl_div", op=lambda m, x, t, **kw: F(m).kl_div(x, t, **kw),
           covers=("log", "where"), gradgradcheck=True, samples=_kl_samples),
]


OPS = ACTIVATIONS + LAYERS + LOSSES
