"""An exception raised inside a module's forward names where in the model it happened, and
keeps its type and message."""
import pytest

import gpudiff
import gpudiff.nn as nn


def test_sequential_names_the_index_and_class():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(9, 10))
    with pytest.raises(RuntimeError) as info:
        model(gpudiff.randn(2, 4, 4))
    msg = str(info.value)
    assert msg.startswith("linear: ")            # the original message comes first
    assert "(2, 8)" in msg                       # ... with its shapes
    assert msg.endswith("in model.3 (Linear)")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv1", nn.Conv2d(1, 4, 3))
        self.features.add_module("conv2", nn.Conv2d(3, 4, 3))   # wrong in-channels
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def test_attributes_give_a_dotted_path():
    with pytest.raises(RuntimeError, match=r"in model\.features\.conv2 \(Conv2d\)$") as info:
        Net()(gpudiff.randn(1, 1, 8, 8))
    assert "expected input[1, 4, 6, 6] to have 3 channels" in str(info.value)


def test_the_called_module_itself_is_model():
    with pytest.raises(RuntimeError, match=r"in model \(Linear\)$"):
        nn.Linear(3, 2)(gpudiff.randn(2, 5))


def test_exception_type_is_kept_and_only_one_location_is_added():
    class Boom(nn.Module):
        def forward(self, x):
            raise KeyError("missing")

    model = nn.Sequential(nn.Identity(), nn.Sequential(Boom()))
    with pytest.raises(KeyError) as info:
        model(gpudiff.ones(1))
    assert info.value.args == ("missing\n  in model.1.0 (Boom)",)


def test_a_second_call_after_an_error_is_clean():
    lin = nn.Linear(3, 2)
    with pytest.raises(RuntimeError):
        lin(gpudiff.randn(2, 5))
    assert lin(gpudiff.randn(2, 3)).shape == (2, 2)
