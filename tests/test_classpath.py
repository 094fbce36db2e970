"""Building objects from ``{class_path, init_args}``: names, types and bare class names."""

from __future__ import annotations

import pytest

from nvmpriv.classpath import check_spec, import_object, instantiate
from nvmpriv.nets import ColumnFC


def test_quoted_numbers_and_bare_names_build_like_lightningcli() -> None:
    spec = {
        "class_path": "ColumnFC",
        "init_args": {"in_features": "64", "num_classes": 10, "dropout": "1e-1"},
    }
    net = instantiate(spec)
    assert isinstance(net, ColumnFC) and net.net[0].in_features == 64
    assert {m.p for m in net.modules() if type(m).__name__ == "Dropout"} == {0.1}
    check_spec({"class_path": "StandardTraining", "init_args": {"net": spec}}, "model")


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (
            {"class_path": "nvmpriv.data.Digits", "init_args": {"sed": 0}},
            r"nvmpriv.data.Digits: unknown init_args \['sed'\]; it accepts batch_size, ",
        ),
        (
            {"class_path": "nvmpriv.data.Digits", "init_args": {"max_samples": "many"}},
            r"max_samples='many' is a str, expected int \| None",
        ),
        (
            {"class_path": "nvmpriv.callbacks.FiniteLossGuard", "init_args": {"x": 1}},
            "it takes no init_args",
        ),
        ({"class_path": "Nope"}, "'Nope' is not a class of nvmpriv.methods"),
        ({"class_path": "nvmpriv.nets.Nope"}, "cannot be imported"),
    ],
)
def test_bad_specs_name_the_class_and_the_fix(spec: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_spec(spec, "data")
    with pytest.raises(ValueError, match=match):
        instantiate(spec)


def test_bare_names_resolve_to_one_object() -> None:
    # lightning.pytorch re-exports its callbacks: the same object found twice is not ambiguous
    assert import_object("EarlyStopping").__module__.startswith("lightning.pytorch.callbacks")
    assert import_object("Adam").__module__.startswith("torch.optim")
