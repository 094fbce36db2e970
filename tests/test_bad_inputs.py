"""A catalogue of bad inputs, each run through the real CLI in a subprocess.

Every case must end with exit code 2 and exactly one ``error: ...`` line on stderr that names the
problem and the fix, print no traceback (``--debug`` brings it back), and leave every file that
existed before the run byte-for-byte unchanged, with no half-written output (``*.tmp``) behind.

Subprocess start-up dominates (importing Lightning takes seconds), so all cases are launched
together by one module fixture with a few worker threads and each test only checks its result.
"""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, write_purchase

QUICKSTART = ROOT / "lightning_configs" / "quickstart.yaml"
HAVE_EXPORT = importlib.util.find_spec("nvmpriv.export") is not None
HAVE_BLACKBOX = importlib.util.find_spec("nvmpriv.blackbox") is not None
SENTINEL = '{"sentinel": true}\n'


@dataclass
class Case:
    """One bad input: how to prepare its folder, the CLI arguments and what the error must say."""

    prepare: Callable[[Path], list[str]]
    needles: tuple[str, ...]
    needs: tuple[bool, str] = (True, "")
    result: subprocess.CompletedProcess[str] | None = None
    before: dict[str, str] = field(default_factory=dict)
    runs_before: set[str] = field(default_factory=set)
    folder: Path | None = None


def _base_config(folder: Path, *, audit: dict[str, object] | None = None) -> Path:
    """Quickstart with one epoch, no progress bar and a small audit; logs under ``folder``."""
    config = yaml.safe_load(QUICKSTART.read_text())
    config["trainer"]["max_epochs"] = 1
    config["trainer"]["enable_progress_bar"] = False
    callbacks = []
    for cb in config["trainer"]["callbacks"]:
        if "RichProgressBar" in cb["class_path"]:
            continue
        if cb["class_path"].endswith("CrossbarAudit"):
            cb["init_args"] = audit or {
                "crossbars": ["ideal"],
                "attacks": ["loss"],
                "max_samples": 50,
                "layer_samples": 0,
                "figures": False,
                "print_table": False,
            }
        callbacks.append(cb)
    config["trainer"]["callbacks"] = callbacks
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _sentinel_run(folder: Path) -> Path:
    """An earlier run's outputs that a failing command must not touch."""
    run = folder / "logs" / "quickstart" / "version_0"
    run.mkdir(parents=True)
    (run / "results.json").write_text(SENTINEL)
    return run


def _fit(folder: Path, *extra: str) -> list[str]:
    _sentinel_run(folder)
    return ["fit", "--config", str(_base_config(folder)), *extra]


def _purchase_args(root: Path) -> list[str]:
    return [
        "--data=nvmpriv.data.Purchase100",
        f"--data.init_args.root={root}",
        "--model.init_args.net.init_args.in_features=600",
        "--model.init_args.net.init_args.num_classes=100",
    ]


def _checkpoint(path: Path, net: str) -> Path:
    """A genuine Lightning checkpoint of StandardTraining(<net>(64, 10)) on Digits (one step)."""
    import lightning.pytorch as pl
    import torch

    from nvmpriv import nets
    from nvmpriv.data import Digits
    from nvmpriv.methods import StandardTraining

    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(path.parent),
    )
    module = StandardTraining(getattr(nets, net)(64, 10), num_classes=10)
    trainer.fit(module, datamodule=Digits(batch_size=32))
    trainer.save_checkpoint(path)
    # Record the method's class path as LightningCLI does for the checkpoints it writes.
    state = torch.load(path, weights_only=True)
    state["hyper_parameters"]["_class_path"] = "nvmpriv.methods.StandardTraining"
    torch.save(state, path)
    return path


# ----------------------------------------------------------------------------- case builders
def unknown_key(d: Path) -> list[str]:
    return _fit(d, "--model.init_args.bogus=3")


def wrong_type(d: Path) -> list[str]:
    return _fit(d, "--trainer.max_epochs=abc")


def net_input_width(d: Path) -> list[str]:
    return _fit(d, "--model.init_args.net.init_args.in_features=32")


def export_callback_output_exists(d: Path) -> list[str]:
    args = _fit(d)  # the sentinel run is version_0, so this fit would be version_1
    (d / "exports").mkdir()
    (d / "exports" / "quickstart_version_1_digital.onnx").write_text(SENTINEL)
    return args


def audit_no_adversarial_samples(d: Path) -> list[str]:
    audit = {"crossbars": ["ideal"], "adversarial_eps": [0.1], "adversarial_samples": 0}
    _sentinel_run(d)
    return ["fit", "--config", str(_base_config(d, audit=audit))]


def callback_bad_argument(d: Path) -> list[str]:
    _sentinel_run(d)
    audit = {"crossbars": ["ideal"], "every_n_epochs": 0}
    return ["fit", "--config", str(_base_config(d, audit=audit))]


def unknown_class_path(d: Path) -> list[str]:
    return _fit(d, "--data=nvmpriv.data.Nope")


def unknown_crossbar_preset(d: Path) -> list[str]:
    _sentinel_run(d)
    audit = {"crossbars": ["ideal", "64x64_nope"], "attacks": ["loss"], "figures": False}
    return ["fit", "--config", str(_base_config(d, audit=audit))]


def invalid_crossbar_field(d: Path) -> list[str]:
    return ["crossbar", "--preset", "no_such_chip"]


def unknown_attack(d: Path) -> list[str]:
    _sentinel_run(d)
    audit = {"crossbars": ["ideal"], "attacks": ["loss", "telepathy"], "figures": False}
    return ["fit", "--config", str(_base_config(d, audit=audit))]


def missing_data_file(d: Path) -> list[str]:
    return _fit(d, *_purchase_args(d / "nowhere"))


def truncated_data_file(d: Path) -> list[str]:
    path = write_purchase(d, n=60)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2 + 7])  # cut in the middle of a row
    return _fit(d, *_purchase_args(d))


def wrong_feature_count(d: Path) -> list[str]:
    write_purchase(d, n=60, n_features=599)
    return _fit(d, *_purchase_args(d))


def labels_out_of_range(d: Path) -> list[str]:
    path = write_purchase(d, n=60)
    lines = path.read_text().splitlines()
    lines[5] = "101" + lines[5][lines[5].index(",") :]
    path.write_text("\n".join(lines) + "\n")
    return _fit(d, *_purchase_args(d))


def split_of_another_dataset(d: Path) -> list[str]:
    from nvmpriv.data import Splits, make_splits

    other = d / "other_run"
    Splits(make_splits(300, seed=0), "0123456789abcdef", "purchase100").save(other)
    return _fit(d, f"--data.init_args.splits_path={other}")


def damaged_split_file(d: Path) -> list[str]:
    other = d / "other_run"
    other.mkdir()
    (other / "splits.npz").write_bytes(b"PK\x03\x04 not really a zip")
    return _fit(d, f"--data.init_args.splits_path={other}")


def too_few_samples(d: Path) -> list[str]:
    return _fit(d, "--data.init_args.max_samples=5")


def missing_checkpoint(d: Path) -> list[str]:
    _sentinel_run(d)
    return ["validate", "--config", str(_base_config(d)), f"--ckpt_path={d / 'gone.ckpt'}"]


def non_checkpoint_file(d: Path) -> list[str]:
    _sentinel_run(d)
    fake = d / "notes.ckpt"
    fake.write_text("these are my notes, not a checkpoint\n")
    return ["validate", "--config", str(_base_config(d)), f"--ckpt_path={fake}"]


def truncated_checkpoint(d: Path) -> list[str]:
    _sentinel_run(d)
    ckpt = _checkpoint(d / "good.ckpt", "ColumnFC")
    raw = ckpt.read_bytes()
    ckpt.write_bytes(raw[: len(raw) // 2])
    return ["validate", "--config", str(_base_config(d)), f"--ckpt_path={ckpt}"]


def _flip_tensor_byte(ckpt: Path) -> None:
    """Flip one byte inside the largest tensor record (torch.load would not notice)."""
    import struct
    import zipfile

    with zipfile.ZipFile(ckpt) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    raw = bytearray(ckpt.read_bytes())
    name_len, extra_len = struct.unpack(
        "<HH", raw[info.header_offset + 26 : info.header_offset + 30]
    )
    raw[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0x40
    ckpt.write_bytes(bytes(raw))


def flipped_checkpoint(d: Path) -> list[str]:
    _sentinel_run(d)
    ckpt = _checkpoint(d / "good.ckpt", "ColumnFC")
    _flip_tensor_byte(ckpt)
    return ["validate", "--config", str(_base_config(d)), f"--ckpt_path={ckpt}"]


def export_flipped_checkpoint(d: Path) -> list[str]:
    ckpt = _checkpoint(d / "good.ckpt", "ColumnFC")
    _flip_tensor_byte(ckpt)
    cfg = str(_base_config(d))
    return ["export", "--config", cfg, "--ckpt_path", str(ckpt), "--output", str(d / "o.onnx")]


def resume_with_another_optimizer(d: Path) -> list[str]:
    ckpt = _checkpoint(d / "good.ckpt", "ColumnFC")  # trained with Adam
    return _fit(
        d,
        f"--ckpt_path={ckpt}",
        "--model.init_args.optimizer=torch.optim.SGD",
        "--model.init_args.optimizer.lr=0.1",
    )


def wrong_architecture(d: Path) -> list[str]:
    _sentinel_run(d)
    ckpt = _checkpoint(d / "nasr.ckpt", "NasrFC")
    return ["validate", "--config", str(_base_config(d)), f"--ckpt_path={ckpt}"]


def last_without_checkpoint(d: Path) -> list[str]:
    return ["validate", "--config", str(_base_config(d)), "--ckpt_path=last"]


# ONNX / black-box cases: the ``attack`` subcommand reads only the exported file and data arrays.
def _onnx(path: Path, *, width: int = 64, metadata: bool = True) -> Path:
    """A tiny valid ONNX classifier (MatMul + Softmax) with nvmpriv's metadata, built by hand."""
    import json

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.full((width, 10), 0.01, np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n", 10])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if metadata:
        meta = {
            "nvmpriv.version": "0",
            "nvmpriv.crossbar": "digital",
            "nvmpriv.input_name": "input",
            "nvmpriv.output_name": "probabilities",
            "nvmpriv.output": "probabilities",
            "nvmpriv.input_shape": json.dumps([width]),
            "nvmpriv.num_classes": "10",
        }
        helper.set_model_props(model, meta)
    onnx.save(model, str(path))
    return path


def _arrays(path: Path, *, n: int = 40, width: int = 64, nan: bool = False) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for role in ("member", "nonmember", "shadow"):
        x = rng.random((n, width)).astype(np.float32)
        if nan and role == "member":
            x[3, 5] = np.nan
        arrays[f"{role}_x"], arrays[f"{role}_y"] = x, rng.integers(0, 10, n)
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def _attack(d: Path, model: Path, data: Path | None = None) -> list[str]:
    (d / "report.json").write_text(SENTINEL)
    data = data or _arrays(d / "arrays.npz")
    return [
        "attack",
        "--model",
        str(model),
        "--data",
        str(data),
        "--attacks",
        "loss",
        "--shadow-epochs",
        "1",
        "--output",
        str(d / "report.json"),
        "--overwrite",  # the sentinel report must survive because the command fails
    ]


def onnx_not_onnx(d: Path) -> list[str]:
    model = d / "model.onnx"
    model.write_text("definitely not a protobuf\n")
    return _attack(d, model)


def onnx_missing(d: Path) -> list[str]:
    return _attack(d, d / "absent.onnx")


def onnx_truncated(d: Path) -> list[str]:
    model = _onnx(d / "cut.onnx")
    raw = model.read_bytes()
    model.write_bytes(raw[: len(raw) // 2])
    return _attack(d, model)


def onnx_missing_metadata(d: Path) -> list[str]:
    return _attack(d, _onnx(d / "bare.onnx", metadata=False))


def onnx_wrong_input_width(d: Path) -> list[str]:
    return _attack(d, _onnx(d / "narrow.onnx", width=10))


def attack_empty_set(d: Path) -> list[str]:
    return _attack(d, _onnx(d / "model.onnx"), _arrays(d / "empty.npz", n=0))


def attack_nan_input(d: Path) -> list[str]:
    return _attack(d, _onnx(d / "model.onnx"), _arrays(d / "nan.npz", nan=True))


def attack_output_exists(d: Path) -> list[str]:
    return _attack(d, _onnx(d / "model.onnx"))[:-1]  # no --overwrite


def attack_output_not_json(d: Path) -> list[str]:
    (d / "keep.txt").write_text("precious\n")
    args = _attack(d, _onnx(d / "model.onnx"))
    args[args.index("--output") + 1] = str(d / "keep.txt")
    return args


def _edited_arrays(path: Path, **changes: np.ndarray) -> Path:
    with np.load(_arrays(path)) as f:
        arrays = {k: f[k] for k in f.files}
    arrays.update(changes)
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def attack_fractional_labels(d: Path) -> list[str]:
    frac = np.full(40, 0.5)
    return _attack(d, _onnx(d / "model.onnx"), _edited_arrays(d / "frac.npz", member_y=frac))


def attack_shadow_labels_out_of_range(d: Path) -> list[str]:
    big = np.full(40, 12)
    return _attack(d, _onnx(d / "model.onnx"), _edited_arrays(d / "big.npz", shadow_y=big))


def attack_truncated_npz(d: Path) -> list[str]:
    data = _arrays(d / "cut.npz")
    data.write_bytes(data.read_bytes()[:200])
    return _attack(d, _onnx(d / "model.onnx"), data)


def onnx_flipped_weight(d: Path) -> list[str]:
    import onnx

    from nvmpriv.runtime import CONTENT_DIGEST_KEY, content_digest

    model = _onnx(d / "model.onnx")
    proto = onnx.load(str(model))
    meta = {p.key: p.value for p in proto.metadata_props}
    onnx.helper.set_model_props(proto, meta | {CONTENT_DIGEST_KEY: content_digest(proto)})
    onnx.save(proto, str(model))
    raw = bytearray(model.read_bytes())
    at = bytes(raw).index(proto.graph.initializer[0].raw_data[:64]) + 100
    raw[at] ^= 0x40  # 0.01 becomes another finite float: the file still parses and runs
    model.write_bytes(bytes(raw))
    return _attack(d, model)


def attack_negative_seed(d: Path) -> list[str]:
    return [*_attack(d, _onnx(d / "model.onnx")), "--seed", "-1"]


def attack_unknown_option(d: Path) -> list[str]:
    return [*_attack(d, _onnx(d / "model.onnx")), "--epochs", "3"]


def crossbar_without_preset(d: Path) -> list[str]:
    return ["crossbar"]


def attack_data_yaml_unknown_key(d: Path) -> list[str]:
    data = d / "digits.yaml"
    data.write_text("data:\n  class_path: nvmpriv.data.Digits\n  init_args: {sed: 3}\n")
    return _attack(d, _onnx(d / "model.onnx"), data)


def attack_data_yaml_wrong_type(d: Path) -> list[str]:
    data = d / "digits.yaml"
    data.write_text("data:\n  class_path: nvmpriv.data.Digits\n  init_args: {seed: abc}\n")
    return _attack(d, _onnx(d / "model.onnx"), data)


def attack_other_split(d: Path) -> list[str]:
    import onnx

    from nvmpriv.runtime import CONTENT_DIGEST_KEY, content_digest

    model = _onnx(d / "model.onnx")
    proto = onnx.load(str(model))
    meta = {p.key: p.value for p in proto.metadata_props} | {"nvmpriv.split_hash": "0" * 64}
    onnx.helper.set_model_props(proto, meta)
    # a genuine export of another split: its digest matches its content
    onnx.helper.set_model_props(proto, meta | {CONTENT_DIGEST_KEY: content_digest(proto)})
    onnx.save(proto, str(model))
    data = d / "digits.yaml"
    data.write_text("data:\n  class_path: nvmpriv.data.Digits\n  init_args: {seed: 3}\n")
    return _attack(d, model, data)


def export_wrong_architecture(d: Path) -> list[str]:
    ckpt = _checkpoint(d / "nasr.ckpt", "NasrFC")
    out = d / "out.onnx"
    return [
        "export",
        "--config",
        str(_base_config(d)),
        "--ckpt_path",
        str(ckpt),
        "--output",
        str(out),
    ]


def export_yaml_syntax(d: Path) -> list[str]:
    (d / "broken.yaml").write_text("model: [1\ndata: 2\n")
    ckpt = d / "x.ckpt"
    ckpt.write_bytes(b"x")
    return ["export", "--config", str(d / "broken.yaml"), "--ckpt_path", str(ckpt)]


def crossbar_bits_too_large(d: Path) -> list[str]:
    (d / "xb.yaml").write_text("preset: 64x64_100k\nadc_bits: 200\n")
    ckpt = _checkpoint(d / "good.ckpt", "ColumnFC")
    cfg = str(_base_config(d))
    return ["export", "--config", cfg, "--ckpt_path", str(ckpt), "--crossbar", str(d / "xb.yaml")]


NO_BLACKBOX = (HAVE_BLACKBOX, "nvmpriv.blackbox (the attack subcommand) does not exist yet")

CASES: dict[str, Case] = {
    "config-unknown-key": Case(unknown_key, ("bogus", "not accepted")),
    "config-wrong-type": Case(wrong_type, ("trainer.max_epochs", "Given value: abc")),
    "config-net-input-width": Case(net_input_width, ("ColumnFC", "in_features to 64")),
    "config-export-exists": Case(export_callback_output_exists, ("version_1_digital", "overwrite")),
    "config-audit-no-samples": Case(audit_no_adversarial_samples, ("adversarial_samples=0",)),
    "config-callback-bad-argument": Case(
        callback_bad_argument, ("CrossbarAudit: every_n_epochs=0",)
    ),
    "config-unknown-class-path": Case(unknown_class_path, ("Nope",)),
    "config-unknown-crossbar-preset": Case(unknown_crossbar_preset, ("64x64_nope",)),
    "config-invalid-crossbar-field": Case(invalid_crossbar_field, ("no_such_chip",)),
    "config-unknown-attack": Case(unknown_attack, ("telepathy",)),
    "data-missing-file": Case(missing_data_file, ("not found", "dataset_purchase")),
    "data-truncated-file": Case(truncated_data_file, ("dataset_purchase", "truncated")),
    "data-wrong-feature-count": Case(wrong_feature_count, ("599", "expected 600")),
    "data-labels-out-of-range": Case(labels_out_of_range, ("101", "expected 1..100")),
    "data-split-of-another-dataset": Case(split_of_another_dataset, ("purchase100", "digits")),
    "data-damaged-split-file": Case(damaged_split_file, ("splits.npz", "regenerate")),
    "data-too-few-samples": Case(too_few_samples, ("too few",)),
    "ckpt-missing": Case(missing_checkpoint, ("gone.ckpt", "not found", "--ckpt_path last")),
    "ckpt-not-a-checkpoint": Case(non_checkpoint_file, ("notes.ckpt", "not a")),
    "ckpt-truncated": Case(truncated_checkpoint, ("good.ckpt", "truncated")),
    "ckpt-flipped-byte": Case(flipped_checkpoint, ("good.ckpt", "CRC-32")),
    "export-ckpt-flipped-byte": Case(export_flipped_checkpoint, ("good.ckpt", "CRC-32")),
    "ckpt-other-optimizer": Case(resume_with_another_optimizer, ("good.ckpt", "Adam", "SGD")),
    "ckpt-wrong-architecture": Case(wrong_architecture, ("nasr.ckpt", "does not fit")),
    "ckpt-last-without-checkpoint": Case(last_without_checkpoint, ("last", "last.ckpt")),
    "onnx-not-onnx": Case(onnx_not_onnx, ("model.onnx",), needs=NO_BLACKBOX),
    "onnx-missing-file": Case(onnx_missing, ("absent.onnx", "not found"), needs=NO_BLACKBOX),
    "onnx-truncated": Case(onnx_truncated, ("cut.onnx",), needs=NO_BLACKBOX),
    "onnx-missing-metadata": Case(onnx_missing_metadata, ("bare.onnx", "metadata"), NO_BLACKBOX),
    "onnx-wrong-input-width": Case(onnx_wrong_input_width, ("narrow.onnx", "10"), NO_BLACKBOX),
    "attack-empty-set": Case(attack_empty_set, ("empty",), needs=NO_BLACKBOX),
    "attack-nan-input": Case(attack_nan_input, ("NaN",), needs=NO_BLACKBOX),
    "attack-output-exists": Case(attack_output_exists, ("report.json", "--overwrite")),
    "attack-output-not-json": Case(attack_output_not_json, ("keep.txt", ".json")),
    "attack-fractional-labels": Case(attack_fractional_labels, ("member_y", "non-integer")),
    "attack-labels-out-of-range": Case(attack_shadow_labels_out_of_range, ("shadow_y", "10")),
    "attack-truncated-npz": Case(attack_truncated_npz, ("cut.npz", "not a readable .npz")),
    "onnx-flipped-weight": Case(onnx_flipped_weight, ("model.onnx", "content does not match")),
    "attack-negative-seed": Case(attack_negative_seed, ("--seed", "integer >= 0")),
    "attack-unknown-option": Case(
        attack_unknown_option, ("unrecognized arguments: --epochs 3", "--help")
    ),
    "crossbar-without-preset": Case(crossbar_without_preset, ("--preset NAME", "--list")),
    "attack-data-unknown-key": Case(attack_data_yaml_unknown_key, ("digits.yaml", "['sed']")),
    "attack-data-wrong-type": Case(attack_data_yaml_wrong_type, ("digits.yaml", "seed='abc'")),
    "attack-other-split": Case(attack_other_split, ("split", "run folder")),
    "export-wrong-architecture": Case(export_wrong_architecture, ("nasr.ckpt", "does not fit")),
    "export-yaml-syntax": Case(export_yaml_syntax, ("broken.yaml", "not valid YAML")),
    "crossbar-bits-too-large": Case(crossbar_bits_too_large, ("adc_bits", "[2, 24]")),
}


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def _runs(folder: Path) -> set[str]:
    """Experiment folders (``logs/<name>/version_N``), empty ones included."""
    return {str(p.relative_to(folder)) for p in folder.glob("logs/*/*") if p.is_dir()}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nvmpriv", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    """Prepare every runnable case, then run them all, a few at a time."""
    jobs = {}
    for name, case in CASES.items():
        if not case.needs[0]:
            continue
        folder = tmp_path_factory.mktemp(name)
        args = case.prepare(folder)
        case.folder = folder
        case.before = _snapshot(folder)
        case.runs_before = _runs(folder)
        jobs[name] = args
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(_run, args, CASES[name].folder) for name, args in jobs.items()}
        for name, future in futures.items():
            CASES[name].result = future.result()
    return CASES


#: Cases that expose a bug outside this test's scope (reported; strict, so a fix is noticed).
KNOWN_BUGS: dict[str, str] = {}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[n]))
        if n in KNOWN_BUGS
        else n
        for n in CASES
    ],
)
def test_bad_input_gives_one_line_and_keeps_outputs(name: str, results: dict[str, Case]) -> None:
    case = results[name]
    if not case.needs[0]:
        pytest.skip(case.needs[1])
    out = case.result
    assert out is not None and case.folder is not None
    report = f"exit {out.returncode}\nSTDERR:\n{out.stderr[-3000:]}"
    assert out.returncode == 2, report
    assert "Traceback" not in out.stderr, report
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, report
    for needle in case.needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    assert " object at 0x" not in errors[0], errors[0]  # no dumps of built objects
    after = _snapshot(case.folder)
    changed = [path for path, digest in case.before.items() if after.get(path) != digest]
    assert not changed, f"existing files changed or removed: {changed}"
    new = set(after) - set(case.before)
    leftovers = [p for p in new if p.endswith((".tmp", ".ckpt", ".onnx", "results.json"))]
    assert not leftovers, f"partial outputs left behind: {leftovers}"
    # a failed run takes no version number from the next good run and leaves no empty
    # experiment folder behind
    assert _runs(case.folder) == case.runs_before, sorted(_runs(case.folder) - case.runs_before)


def test_debug_flag_restores_the_traceback(tmp_path: Path) -> None:
    out = _run([*_fit(tmp_path, "--data.init_args.max_samples=5"), "--debug"], tmp_path)
    assert out.returncode != 0
    assert "Traceback" in out.stderr and "too few" in out.stderr


def test_one_line_condenses_multiline_messages() -> None:
    from nvmpriv.__main__ import one_line

    exc = ValueError("Problem with field x:\n  - Given value type: str\n  - expected int\n")
    assert one_line(exc) == "Problem with field x: expected int"


def test_one_line_drops_the_parsed_namespace_dump() -> None:
    from nvmpriv.__main__ import one_line

    exc = ValueError(
        "Parser key \"model\":\n  source_checkpoint='x.ckpt' is corrupt; re-train it\n"
        "  Given value: Namespace(class_path='nvmpriv.methods.PPBFineTuning', init_args="
        "Namespace(net=Namespace(class_path='nvmpriv.nets.ColumnFC')))\n"
    )
    assert (
        one_line(exc) == "Parser key \"model\": source_checkpoint='x.ckpt' is corrupt; re-train it"
    )


def test_one_line_keeps_flags_and_negative_numbers() -> None:
    from nvmpriv.__main__ import one_line

    assert one_line(ValueError("--ckpt_path x not found")) == "--ckpt_path x not found"
    assert (
        one_line(ValueError("-1 is not in bounds\n  - use >= 0")) == "-1 is not in bounds use >= 0"
    )


def test_yaml_files_read_scientific_floats_and_name_syntax_errors(tmp_path: Path) -> None:
    from nvmpriv.yamlfile import read_yaml

    good = tmp_path / "xb.yaml"
    good.write_text("g_max: 1e-5\nr_wire: 1.0e12\ntile_size: 64\nname: '1e3'\n")
    assert read_yaml(good, "--crossbar") == {
        "g_max": 1e-5,
        "r_wire": 1e12,
        "tile_size": 64,
        "name": "1e3",
    }
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1\nb: 2\n")
    with pytest.raises(ValueError, match=r"--config .*bad.yaml is not valid YAML \(line 2"):
        read_yaml(bad, "--config")
    with pytest.raises(ValueError, match="is a folder"):
        read_yaml(tmp_path, "--config")


def test_case_catalogue_is_large_enough() -> None:
    """The issue asks for at least 15 distinct cases over config, data, checkpoints and ONNX."""
    groups = {name.split("-")[0] for name in CASES}
    assert len(CASES) >= 15 and {"config", "data", "ckpt", "onnx", "attack"} <= groups
