"""`slit convert-torch` / `convert_torch_checkpoint`: torch.save files -> safetensors, weights only."""

import hashlib
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from safetensors import safe_open  # noqa: E402

from slit import cli  # noqa: E402
from slit.errors import UserError  # noqa: E402
from slit.interop.torch_checkpoint import convert_torch_checkpoint  # noqa: E402


class Custom:
    """A class that a weights-only unpickler must refuse to build."""

    def __init__(self) -> None:
        self.value = 3


def _state_dict() -> dict:
    torch.manual_seed(0)
    embedding = torch.randn(10, 4)
    base = torch.randn(6, 5)
    return {
        "embed.weight": embedding,
        "head.weight": embedding,  # tied: the same tensor under two names
        "proj.weight": base.t(),  # not contiguous
        "proj.bias": base[0, :3],  # a view into a bigger storage
        "norm.weight": torch.randn(4, dtype=torch.bfloat16),
        "bn.num_batches_tracked": torch.tensor(7),
        "mask": torch.tensor([True, False]),
    }


def _read(path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _assert_same(written: dict, expected: dict) -> None:
    assert sorted(written) == sorted(expected)
    for name, value in expected.items():
        assert written[name].dtype == value.dtype, name
        assert torch.equal(written[name], value), name


@pytest.mark.parametrize(
    "layout, key, expected_key",
    [
        ("plain", None, ""),
        ("model", None, "model"),
        ("state_dict", None, "state_dict"),
        ("custom", "weights", "weights"),
        ("data_parallel", None, "model"),
    ],
)
def test_convert(tmp_path, layout, key, expected_key):
    sd = _state_dict()
    if layout == "plain":
        obj = sd
    elif layout == "model":  # Pengi's releases
        obj = {"model": sd, "epoch": 3, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}
    elif layout == "state_dict":  # PyTorch Lightning
        obj = {"state_dict": sd, "global_step": 10, "hyper_parameters": {"width": 4}}
    elif layout == "custom":
        obj = {"weights": sd, "other": {"x.weight": torch.ones(2)}, "name": "run-1"}
    else:  # nn.DataParallel
        obj = {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}
    src = tmp_path / "ckpt.pt"
    torch.save(obj, src)
    dst = tmp_path / "out" / "ckpt.safetensors"
    report = convert_torch_checkpoint(src, dst, key=key)

    written, metadata = _read(dst)
    _assert_same(written, sd)
    assert report.key == expected_key
    assert report.stripped_prefix == ("module." if layout == "data_parallel" else "")
    assert report.tensors == len(sd) and report.bytes == sum(v.nbytes for v in sd.values())
    assert {"embed.weight", "head.weight", "proj.weight", "proj.bias"} <= set(report.copied)
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    assert metadata == {
        "format": "pt",
        "source": "ckpt.pt",
        "source_sha256": sha,
        "state_dict_key": expected_key,
        "stripped_prefix": report.stripped_prefix,
        "tensor_count": str(len(sd)),
        "converted_by": "slit convert-torch",
    }
    expected_skipped = {
        "plain": set(),
        "model": {"epoch (int)", "optimizer (dict)"},
        "state_dict": {"global_step (int)", "hyper_parameters (dict)"},
        "custom": {"other (dict)", "name (str)"},
        "data_parallel": {"epoch (int)"},
    }[layout]
    assert set(report.skipped) == expected_skipped
    assert f"{len(sd)} tensors" in report.summary()


def test_non_tensor_entries_in_the_state_dict_are_skipped(tmp_path):
    src = tmp_path / "ckpt.pt"
    torch.save({"model": {"w": torch.ones(3), "version": 2, "_metadata": {"": {"version": 1}}}}, src)
    report = convert_torch_checkpoint(src, tmp_path / "w.safetensors")
    assert report.tensors == 1
    assert set(report.skipped) == {"model.version (int)", "model._metadata (dict)"}
    written, _ = _read(tmp_path / "w.safetensors")
    _assert_same(written, {"w": torch.ones(3)})


def test_cli(tmp_path, capsys):
    sd = _state_dict()
    src, dst = tmp_path / "pengi.pt", tmp_path / "pengi.safetensors"
    torch.save({"model": sd, "epoch": 3}, src)
    assert cli.main(["convert-torch", str(src), str(dst)]) == 0
    out = capsys.readouterr().out
    assert f"{len(sd)} tensors" in out and "bytes" in out and "epoch (int)" in out
    written, _ = _read(dst)
    _assert_same(written, sd)

    torch.save({"weights": sd}, src)
    assert cli.main(["convert-torch", str(src), str(dst), "--key", "weights"]) == 0
    _assert_same(_read(dst)[0], sd)
    assert cli.main(["convert-torch", str(src), str(dst), "--key", "absent"]) == 2
    assert "has no key 'absent'" in capsys.readouterr().err


def test_refuses_code(tmp_path, capsys):
    src = tmp_path / "code.pt"
    torch.save({"model": {"w": torch.ones(2)}, "obj": Custom()}, src)
    with pytest.raises(
        UserError, match=r"code.pt is not a weights-only loadable PyTorch checkpoint.*never unpickles"
    ):
        convert_torch_checkpoint(src, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    assert cli.main(["convert-torch", str(src), str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "never unpickles code" in err and len(err.strip().splitlines()) == 1
    assert "Unsupported global: GLOBAL " in err and "Custom" in err  # what torch refused, named
    assert "weights_only=False" not in err  # torch's advice to run the file's code is not passed on

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(100))
    with pytest.raises(UserError, match="not a weights-only loadable"):
        convert_torch_checkpoint(garbage, tmp_path / "x.safetensors")


def test_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        convert_torch_checkpoint(tmp_path / "absent.pt", tmp_path / "x.safetensors")

    empty = tmp_path / "empty.pt"
    torch.save({"epoch": 3, "config": {"width": 4}}, empty)
    with pytest.raises(UserError, match=r"holds no tensors .*--key"):
        convert_torch_checkpoint(empty, tmp_path / "x.safetensors")
    torch.save({"model": {"epoch": 3}}, empty)
    with pytest.raises(UserError, match="holds no tensors under 'model'"):
        convert_torch_checkpoint(empty, tmp_path / "x.safetensors", key="model")
    torch.save([torch.ones(2)], empty)
    with pytest.raises(UserError, match="holds a list, not a dict"):
        convert_torch_checkpoint(empty, tmp_path / "x.safetensors")
    torch.save({"model": {"w": torch.ones(2)}}, empty)
    with pytest.raises(UserError, match="is the source checkpoint itself"):
        convert_torch_checkpoint(empty, empty)


def test_without_torch(tmp_path, monkeypatch):
    src = tmp_path / "ckpt.pt"
    torch.save({"w": torch.ones(2)}, src)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'slit\[torch\]'"):
        convert_torch_checkpoint(src, tmp_path / "x.safetensors")
