"""nn.Module behaviour against PyTorch's: registration, traversal, state_dict, to(), repr."""
import copy
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch

import gpudiff
from gpudiff import nn


def make_net(nn, lib):
    """The same architecture built with gpudiff (nn, gpudiff) or PyTorch (torch.nn, torch)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
            self.scale = nn.Parameter(lib.ones(1))
            self.register_buffer("counter", lib.zeros(2))
            self.register_buffer("scratch", lib.zeros(2), persistent=False)
    return Net()


def Net():
    return make_net(nn, gpudiff)


def torch_net():
    return make_net(torch.nn, torch)


def test_parameter_is_a_tensor_with_grad_and_repr():
    p = nn.Parameter(gpudiff.tensor([1.0, 2.0]))
    assert isinstance(p, nn.Parameter) and isinstance(p, gpudiff.Tensor)
    assert p.requires_grad and p.is_leaf
    assert repr(p) == "Parameter containing:\ntensor([1., 2.], requires_grad=True)"
    assert not nn.Parameter(gpudiff.zeros(2), requires_grad=False).requires_grad
    # ops on a Parameter give plain tensors, and the Parameter shares memory with its data
    t = gpudiff.zeros(3)
    q = nn.Parameter(t)
    assert type(q * 2) is gpudiff.Tensor
    with gpudiff.no_grad():
        q.add_(1)
    assert t.tolist() == [1.0, 1.0, 1.0]
    c = copy.deepcopy(q)
    assert isinstance(c, nn.Parameter) and c is not q and c.tolist() == [1.0, 1.0, 1.0]
    assert isinstance(pickle.loads(pickle.dumps(q)), nn.Parameter)


def test_registration_order_and_names_match_torch():
    ours, ref = Net(), torch_net()
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()]
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in ref.named_modules()]
    assert [n for n, _ in ours.named_children()] == [n for n, _ in ref.named_children()]
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert "bn.num_batches_tracked" in ours.state_dict()
    assert "scratch" not in ours.state_dict()  # non-persistent
    assert [n for n, _ in ours.named_parameters(prefix="m", recurse=False)] == ["m.scale"]
    assert len(list(ours.parameters())) == len(list(ref.parameters())) == 9
    assert len(list(ours.modules())) == 7


def test_state_dict_tensors_are_detached_and_share_memory():
    m = nn.Linear(3, 2)
    sd = m.state_dict()
    assert isinstance(sd, OrderedDict)
    assert not sd["weight"].requires_grad and not isinstance(sd["weight"], nn.Parameter)
    with gpudiff.no_grad():
        m.weight.fill_(3.0)
    assert float(sd["weight"][0, 0]) == 3.0
    kv = m.state_dict(keep_vars=True)
    assert kv["weight"] is m.weight


def test_shared_parameter_listed_once():
    lin = nn.Linear(2, 2)
    m = nn.Sequential(lin, lin)
    assert len(list(m.parameters())) == 2
    assert list(m.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias"]


def test_setattr_rules_and_errors():
    m = nn.Linear(2, 3)
    with pytest.raises(TypeError, match="cannot assign .* as parameter 'weight'"):
        m.weight = gpudiff.zeros(3, 2)
    m.bias = None  # allowed: parameter removed from the state
    assert list(m.state_dict()) == ["weight"]
    with pytest.raises(AttributeError, match="'Linear' object has no attribute 'nope'"):
        _ = m.nope

    class Early(nn.Module):
        def __init__(self):
            self.w = nn.Parameter(gpudiff.zeros(1))
    with pytest.raises(AttributeError, match="before Module.__init__"):
        Early()
    m2 = nn.Module()
    with pytest.raises(KeyError, match="contain"):
        m2.register_buffer("a.b", gpudiff.zeros(1))
    with pytest.raises(TypeError):
        m2.register_buffer("x", 3)
    m2.sub = nn.ReLU()
    m2.sub = nn.Tanh()  # replacing a child keeps its slot
    assert list(dict(m2.named_children())) == ["sub"]
    del m2.sub
    assert list(m2.children()) == []


def test_train_eval_apply_requires_grad_zero_grad():
    m = Net()
    assert m.training and m.body[1].training
    assert m.eval() is m
    assert not any(mod.training for mod in m.modules())
    m.train()
    assert all(mod.training for mod in m.modules())
    seen = []
    m.apply(lambda mod: seen.append(type(mod).__name__))
    assert seen[-1] == "Net" and seen[0] == "Conv2d"
    m.requires_grad_(False)
    assert not any(p.requires_grad for p in m.parameters())
    m.requires_grad_()
    x = gpudiff.randn(5, 4)
    m.body(x).sum().backward()
    assert m.body[0].weight.grad is not None
    m.zero_grad(set_to_none=False)
    assert float(m.body[0].weight.grad.abs().sum()) == 0.0
    m.zero_grad()
    assert m.body[0].weight.grad is None


def test_to_dtype_keeps_parameter_objects_and_integer_buffers():
    m = nn.BatchNorm1d(3)
    w = m.weight
    m.double()
    assert m.weight is w and w.dtype == np.float64
    assert m.running_mean.dtype == np.float64
    assert m.num_batches_tracked.dtype == np.int64  # integer buffers keep their dtype
    m.to(gpudiff.float32)
    assert m.weight is w and w.dtype == np.float32
    with pytest.raises(TypeError, match="floating point"):
        m.to(gpudiff.int64)


def test_to_device_emulated_cuda_moves_parameters_buffers_and_grads():
    if not gpudiff.cuda.is_available():
        pytest.skip("no cuda (emulated or real)")
    m = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    p0 = m[0].weight
    m[0](gpudiff.randn(4, 3)).sum().backward()
    m.to("cuda")
    assert m[0].weight is p0 and p0.device.type == "cuda"
    assert p0.grad.device.type == "cuda"
    assert m[1].running_var.device.type == "cuda"
    m.cpu()
    assert p0.device.type == "cpu" and p0.grad.device.type == "cpu"


@pytest.mark.parametrize("build", [
    lambda nn: nn.Linear(5, 3),
    lambda nn: nn.Linear(5, 3, bias=False),
    lambda nn: nn.LayerNorm((4, 5)),
    lambda nn: nn.Embedding(10, 5, padding_idx=2),
    lambda nn: nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)),
])
def test_load_torch_state_dict_gives_same_output(build):
    torch.manual_seed(0)
    ref = build(torch.nn)
    ours = build(nn)
    res = ours.load_state_dict({k: gpudiff.tensor(v.numpy()) for k, v in
                                ref.state_dict().items()})
    assert res.missing_keys == [] and res.unexpected_keys == []
    assert repr(res) == "<All keys matched successfully>"
    if isinstance(ref, torch.nn.Embedding):
        x = np.array([[1, 2, 9], [0, 2, 3]])
        a = ref(torch.tensor(x)).detach().numpy()
        b = ours(gpudiff.tensor(x)).detach().numpy()
    else:
        x = np.random.default_rng(1).standard_normal((3, 4, 5)).astype(np.float32)
        a = ref(torch.tensor(x)).detach().numpy()
        b = ours(gpudiff.tensor(x)).detach().numpy()
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_load_state_dict_accepts_numpy_and_torch_values():
    ref = torch.nn.Linear(3, 2)
    ours = nn.Linear(3, 2)
    ours.load_state_dict(ref.state_dict())  # torch tensors, via __array__
    np.testing.assert_array_equal(ours.weight.detach().numpy(), ref.weight.detach().numpy())
    ours.load_state_dict({k: v.detach().numpy() * 2 for k, v in ref.state_dict().items()})
    np.testing.assert_array_equal(ours.bias.detach().numpy(), ref.bias.detach().numpy() * 2)


def test_load_state_dict_errors_like_torch():
    ours, ref = nn.Linear(3, 2), torch.nn.Linear(3, 2)
    sd_ours = {"weight": gpudiff.zeros(2, 3), "extra": gpudiff.zeros(1)}
    sd_ref = {"weight": torch.zeros(2, 3), "extra": torch.zeros(1)}
    with pytest.raises(RuntimeError) as e_ours:
        ours.load_state_dict(sd_ours)
    with pytest.raises(RuntimeError) as e_ref:
        ref.load_state_dict(sd_ref)
    assert str(e_ours.value) == str(e_ref.value)
    assert 'Missing key(s) in state_dict: "bias"' in str(e_ours.value)
    assert 'Unexpected key(s) in state_dict: "extra"' in str(e_ours.value)
    res = ours.load_state_dict(sd_ours, strict=False)
    ref_res = ref.load_state_dict(sd_ref, strict=False)
    assert (res.missing_keys, res.unexpected_keys) == (ref_res.missing_keys,
                                                       ref_res.unexpected_keys)
    assert float(ours.weight.abs().sum()) == 0.0  # the keys that matched were loaded
    # a shape mismatch is an error even with strict=False
    with pytest.raises(RuntimeError, match=r"size mismatch for weight: copying a param with "
                                           r"shape gpudiff.Size\(\[3, 3\]\) from checkpoint, "
                                           r"the shape in current model is "
                                           r"gpudiff.Size\(\[2, 3\]\)"):
        ours.load_state_dict({"weight": gpudiff.zeros(3, 3)}, strict=False)
    with pytest.raises(TypeError, match="dict-like"):
        ours.load_state_dict([1, 2])


def test_state_dict_round_trip_nested_and_batchnorm():
    a, b = Net(), Net()
    with gpudiff.no_grad():
        a.bn.running_mean.copy_(gpudiff.tensor([1.0, 2.0, 3.0, 4.0]))
        a.bn.num_batches_tracked.fill_(7)
    b.load_state_dict(a.state_dict())
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        np.testing.assert_array_equal(x.numpy(), y.numpy(), err_msg=k)
    assert int(b.bn.num_batches_tracked) == 7
    # an old checkpoint without num_batches_tracked still loads (as in PyTorch)
    sd = a.bn.state_dict()
    del sd["num_batches_tracked"]
    assert nn.BatchNorm2d(4).load_state_dict(sd).missing_keys == []


def test_load_state_dict_assign():
    m = nn.Linear(2, 2)
    w = gpudiff.ones(2, 2)
    m.load_state_dict({"weight": w, "bias": gpudiff.zeros(2)}, assign=True)
    assert isinstance(m.weight, nn.Parameter) and m.weight.requires_grad
    assert m.weight.array is w.array


def test_forward_hooks():
    m = nn.Linear(2, 2)
    calls = []
    h1 = m.register_forward_pre_hook(lambda mod, args: (args[0] * 0,))
    h2 = m.register_forward_hook(lambda mod, args, out: calls.append(out.shape) or out + 1)
    y = m(gpudiff.ones(3, 2))
    np.testing.assert_allclose(y.detach().numpy(),
                               np.broadcast_to(m.bias.detach().numpy() + 1, (3, 2)), rtol=1e-6)
    assert calls == [(3, 2)]
    h1.remove()
    h2.remove()
    np.testing.assert_allclose(m(gpudiff.ones(1, 2)).detach().numpy(),
                               (m.weight.sum(1) + m.bias).detach().numpy()[None], rtol=1e-6)


def test_forward_missing_raises():
    with pytest.raises(NotImplementedError, match='missing the required "forward"'):
        nn.Module()(gpudiff.zeros(1))


def test_repr_matches_torch_for_a_cnn():
    def build(nn):
        class Model(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv1 = nn.Conv2d(1, 32, 3, 1)
                self.conv2 = nn.Conv2d(32, 64, kernel_size=(3, 5), stride=2, padding=1,
                                       bias=False, groups=2)
                self.conv3 = nn.Conv2d(4, 4, 3, padding="same", padding_mode="reflect",
                                       dilation=2)
                self.deconv = nn.ConvTranspose2d(4, 2, 2, stride=2, output_padding=1)
                self.pool = nn.MaxPool2d(2)
                self.avg = nn.AvgPool2d(3, stride=1, padding=1)
                self.gap = nn.AdaptiveAvgPool2d((1, 1))
                self.gmp = nn.AdaptiveMaxPool2d(2)
                self.bn1 = nn.BatchNorm1d(10, momentum=None, affine=False)
                self.bn2 = nn.BatchNorm2d(32)
                self.ln = nn.LayerNorm(10, elementwise_affine=False)
                self.dropout1 = nn.Dropout(0.25)
                self.dropout2 = nn.Dropout2d(0.5, inplace=True)
                self.flatten = nn.Flatten()
                self.unflatten = nn.Unflatten(1, (2, 5))
                self.emb = nn.Embedding(10, 3, padding_idx=-1, max_norm=1.0)
                self.fc1 = nn.Linear(9216, 128)
                self.acts = nn.ModuleList([nn.ReLU(), nn.ReLU(), nn.LeakyReLU(0.2, True),
                                           nn.ELU(), nn.GELU("tanh"), nn.SiLU(), nn.Sigmoid(),
                                           nn.Tanh(), nn.Softmax(dim=1), nn.LogSoftmax(1),
                                           nn.Softplus(beta=2), nn.Hardtanh(-2, 2),
                                           nn.ReLU6(inplace=True), nn.Identity()])
                self.heads = nn.ModuleDict({"a": nn.Linear(2, 2, bias=False)})
                self.losses = nn.Sequential(nn.CrossEntropyLoss(), nn.NLLLoss(), nn.MSELoss(),
                                            nn.L1Loss(), nn.SmoothL1Loss(), nn.HuberLoss(),
                                            nn.BCELoss(), nn.BCEWithLogitsLoss(),
                                            nn.MultiMarginLoss(), nn.KLDivLoss())
        return Model()
    assert repr(build(nn)) == repr(build(torch.nn))


def test_containers():
    seq = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    assert len(seq) == 3 and isinstance(seq[-1], nn.Linear)
    sub = seq[1:]
    assert isinstance(sub, nn.Sequential) and len(sub) == 2
    assert list(sub.state_dict()) == ["2.weight", "2.bias"]  # original names kept, as torch
    seq.append(nn.Sigmoid())
    assert isinstance(seq[3], nn.Sigmoid)
    del seq[1]
    assert [type(m).__name__ for m in seq] == ["Linear", "Linear", "Sigmoid"]
    assert list(seq.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    with pytest.raises(IndexError, match="index 5 is out of range"):
        seq[5]
    y = seq(gpudiff.randn(4, 2))
    assert y.shape == (4, 1) and float(y.min()) >= 0.0
    named = nn.Sequential(OrderedDict([("fc", nn.Linear(2, 2)), ("act", nn.ReLU())]))
    assert list(named.state_dict()) == ["fc.weight", "fc.bias"]
    assert named.fc is named[0]

    ml = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
    ml.append(nn.ReLU())
    ml.insert(0, nn.Tanh())
    assert len(ml) == 5 and isinstance(ml[0], nn.Tanh) and isinstance(ml[-1], nn.ReLU)
    assert len(list(ml.parameters())) == 6
    ref = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])
    ref.append(torch.nn.ReLU())
    ref.insert(0, torch.nn.Tanh())
    assert repr(ml) == repr(ref)
    assert isinstance(ml[1:3], nn.ModuleList) and len(ml[1:3]) == 2

    md = nn.ModuleDict({"a": nn.Linear(1, 1)})
    md["b"] = nn.Linear(1, 2)
    assert list(md.keys()) == ["a", "b"] and "b" in md and len(md) == 2
    assert list(md.state_dict()) == ["a.weight", "a.bias", "b.weight", "b.bias"]
    assert md.pop("a") is not None and list(md) == ["b"]

    pl = nn.ParameterList([nn.Parameter(gpudiff.zeros(2)), gpudiff.ones(3)])
    assert all(isinstance(p, nn.Parameter) for p in pl)
    assert list(pl.state_dict()) == ["0", "1"]


def test_identity_flatten_unflatten():
    x = gpudiff.randn(2, 3, 4, 5)
    assert nn.Identity(7, foo=1)(x) is x
    assert nn.Flatten()(x).shape == (2, 60)
    assert nn.Flatten(0, 2)(x).shape == (24, 5)
    assert nn.Unflatten(1, (3, 20))(nn.Flatten()(x)).shape == (2, 3, 20)
    assert repr(nn.Unflatten(1, (3, 20))) == repr(torch.nn.Unflatten(1, (3, 20)))
