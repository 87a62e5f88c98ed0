"""Weight conversion to and from torchvision: same logits, exact round trips, clear errors."""

import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models import resnet as tv_resnet

# Reduced-depth models, one block per stage: torchvision's ResNet class and our config.
from resnext_jax.models import interop, variants
from resnext_jax.training import checkpoint
from tests.conftest import slow_unless

REDUCED = {
    "resnext14_4x16d": (
        dict(stage_sizes=(1, 1, 1, 1), depth=14, cardinality=4, base_width=16, num_classes=10),
        lambda: tv_resnet.ResNet(tv_resnet.Bottleneck, [1, 1, 1, 1], groups=4,
                                 width_per_group=16, num_classes=10),
    ),
    "resnet10": (
        dict(stage_sizes=(1, 1, 1, 1), depth=10, block="basic", num_classes=10),
        lambda: tv_resnet.ResNet(tv_resnet.BasicBlock, [1, 1, 1, 1], num_classes=10),
    ),
}  # fmt: skip


def _config(name):
    if name in REDUCED:
        return variants.model_config("resnet50", **REDUCED[name][0])
    return variants.model_config(name)


def _torch_model(name, seed=0):
    """torchvision's model with random weights, BN affine parameters and BN statistics.

    The statistics are measured on random images and then perturbed. Each block's last BN
    scale is small (timm, and torchvision with zero_init_residual, start it at 0), which keeps
    the residual stream and the logits at about unit scale: with unit scales there the logits
    of resnet50 reach 20-40, where float32 rounding alone (torch in float32 against float64)
    exceeds 1e-4.
    """
    torch.manual_seed(seed)
    model = REDUCED[name][1]() if name in REDUCED else getattr(torchvision.models, name)()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    blocks = [
        m for m in model.modules() if isinstance(m, tv_resnet.BasicBlock | tv_resnet.Bottleneck)
    ]
    with torch.no_grad():
        for bn in norms:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.2)
            bn.momentum = None  # running statistics = this batch's
        for block in blocks:
            getattr(block, "bn3", block.bn2).weight.uniform_(0.2, 0.5)
        model.train()(torch.randn(2, 3, 64, 64))
        for bn in norms:
            bn.running_mean.add_(torch.randn_like(bn.running_mean), alpha=0.1)
            bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.8, 1.25))
    return model.eval()


def _images(seed=1, size=64):
    return np.random.default_rng(seed).standard_normal((2, 3, size, size), np.float32)


@pytest.mark.parametrize(
    "name", slow_unless(interop.TORCHVISION_MODELS, ("resnet50", "resnext50_32x4d"))
)
def test_layout_is_torchvisions(name):
    """Every torchvision ResNet: the same keys with the same shapes, in the same order."""
    with torch.device("meta"):  # shapes only, no memory
        expected = getattr(torchvision.models, name)(weights=None).state_dict()
    expected = {k: tuple(v.shape) for k, v in expected.items() if "num_batches" not in k}
    assert list(interop.torchvision_shapes(name).items()) == list(expected.items())


@pytest.mark.parametrize(
    "name", slow_unless(["resnet50", "resnext50_32x4d", *REDUCED], ["resnext50_32x4d", *REDUCED])
)
def test_same_logits_as_torchvision(name):
    torch_model = _torch_model(name)
    config = _config(name)
    variables = interop.from_torchvision(torch_model.state_dict(), config)
    diff, scale = interop.logit_difference(torch_model, variables, config, _images())
    print(f"{name}: max |logit difference| {diff:.3g}, max |logit| {scale:.3g}")
    assert diff <= 1e-4


def test_round_trip_is_exact():
    """Flax -> torch (loaded strictly into torchvision's model) -> Flax, bit for bit."""
    config = _config("resnext14_4x16d")
    model = variants.build_model(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.standard_normal(s.shape, s.dtype), shapes)
    torch_model = REDUCED["resnext14_4x16d"][1]()
    torch_model.load_state_dict(interop.torch_tensors(interop.to_torchvision(variables, config)))
    back = interop.from_torchvision(torch_model.state_dict(), config)
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _state_dict(name):
    return {k: np.asarray(v) for k, v in REDUCED[name][1]().state_dict().items()}


def test_mismatched_state_dict_raises():
    config = _config("resnext14_4x16d")
    state_dict = _state_dict("resnext14_4x16d")

    missing = {k: v for k, v in state_dict.items() if k != "layer2.0.bn2.running_var"}
    with pytest.raises(ValueError, match=r"1 missing \(first: 'layer2.0.bn2.running_var', "):
        interop.from_torchvision(missing, config)

    wrong_shape = {**state_dict, "fc.weight": np.zeros((5, 2048), np.float32)}
    with pytest.raises(ValueError, match=r"'fc.weight' has shape \(5, 2048\), the model needs "
                                         r"\(10, 2048\).*its fc has 5 classes"):  # fmt: skip
        interop.from_torchvision(wrong_shape, config)

    extra = {**state_dict, "fc2.weight": np.zeros((3,), np.float32)}
    with pytest.raises(ValueError, match=r"1 unexpected \(first: 'fc2.weight', shape \(3,\)\)"):
        interop.from_torchvision(extra, config)

    # A basic-block ResNet's state_dict for a bottleneck ResNeXt: the first difference named.
    with pytest.raises(ValueError, match=r"does not match resnext14_4x16d with 10 classes: "
                                         r"\d+ missing \(first: 'layer1.0.conv3.weight', "
                                         r"shape \(256, 64, 1, 1\)\)"):  # fmt: skip
        interop.from_torchvision(_state_dict("resnet10"), config)

    prefixed = {f"module.{k}": v for k, v in state_dict.items()}
    with pytest.raises(ValueError, match="strip that prefix"):
        interop.from_torchvision(prefixed, config)


def test_load_state_dict_refuses_other_files(tmp_path):
    torch.save(REDUCED["resnet10"][1](), tmp_path / "module.pth")
    with pytest.raises(ValueError, match="not a plain state_dict"):
        interop.load_state_dict(tmp_path / "module.pth")
    torch.save({"epoch": 3, "state_dict": {}}, tmp_path / "training.pth")
    with pytest.raises(ValueError, match=r"not a state_dict.*\['epoch', 'state_dict'\]"):
        interop.load_state_dict(tmp_path / "training.pth")


def _script(*args):
    return subprocess.run([sys.executable, "scripts/convert_torchvision.py", *args],
                          capture_output=True, text=True)  # fmt: skip


@pytest.mark.slow
def test_script_converts_verifies_and_exports(tmp_path):
    torch.save(_torch_model("resnet18").state_dict(), tmp_path / "resnet18.pth")
    done = _script("--model=resnet18", f"--weights={tmp_path / 'resnet18.pth'}",
                   f"--out={tmp_path / 'ckpt'}", "--verify", "--image_size=64")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "verify: max |logit difference|" in done.stdout and "within 0.0001" in done.stdout
    variables, config = checkpoint.load_variables(tmp_path / "ckpt")
    assert config.to_dict() == variants.model_config("resnet18").to_dict()

    done = _script("--reverse", f"--checkpoint={tmp_path / 'ckpt'}",
                   f"--out={tmp_path / 'back.pth'}")  # fmt: skip
    assert done.returncode == 0, done.stderr
    original = torch.load(tmp_path / "resnet18.pth", weights_only=True)
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert list(back) == list(original)
    for k, v in original.items():
        if "num_batches" not in k:
            assert torch.equal(back[k], v), k
    torchvision.models.resnet18().load_state_dict(back)  # strict

    done = _script("--model=resnet50", f"--weights={tmp_path / 'resnet18.pth'}",
                   f"--out={tmp_path / 'wrong'}")  # fmt: skip
    assert done.returncode == 2 and "does not match resnet50" in done.stderr


def _damage(tmp_path):
    """.pth files torch cannot read: cut short (a partial download), empty, or not torch's."""
    torch.save(REDUCED["resnet10"][1]().state_dict(), tmp_path / "whole.pth")
    whole = (tmp_path / "whole.pth").read_bytes()
    files = {
        "half.pth": whole[: len(whole) // 2],
        "short_end.pth": whole[:-5],
        "one_byte.pth": whole[:1],
        "empty.pth": b"",
        "garbage.pth": b"<html>404 Not Found</html>\n" * 20,
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return [tmp_path / name for name in files]


def test_load_state_dict_names_a_damaged_file(tmp_path):
    for path in _damage(tmp_path):
        with pytest.raises(ValueError) as info:
            interop.load_state_dict(path)
        message = str(info.value)
        assert message.startswith(f"{path} ({path.stat().st_size} bytes) looks truncated or "
                                  "corrupt: torch.load could not read it"), message  # fmt: skip
        assert "Download it again" in message
    with pytest.raises(FileNotFoundError):
        interop.load_state_dict(tmp_path / "missing.pth")


def test_verify_logits_sees_other_weights():
    """The same weights agree within the tolerance; a head bias 1e-3 off does not."""
    name = "resnet10"
    config = _config(name)
    state_dict = _torch_model(name).state_dict()
    variables = interop.from_torchvision(state_dict, config)
    diff, _ = interop.verify_logits(state_dict, variables, config, image_size=32)
    assert diff <= interop.VERIFY_TOLERANCE
    variables["params"]["head"]["bias"] = variables["params"]["head"]["bias"] + 1e-3
    diff, _ = interop.verify_logits(state_dict, variables, config, image_size=32)
    assert diff == pytest.approx(1e-3, rel=1e-2)


def test_removed_on_failure_removes_only_what_the_body_created(tmp_path):
    class Failed(Exception):
        pass

    # A new folder and the new folders above it: the topmost goes.
    with pytest.raises(Failed), interop.removed_on_failure(tmp_path / "a" / "b" / "ckpt"):
        (tmp_path / "a" / "b" / "ckpt" / "variables").mkdir(parents=True)
        (tmp_path / "a" / "b" / "ckpt" / "model.json").write_text("{")
        raise Failed
    assert list(tmp_path.iterdir()) == []

    # A folder that existed keeps what it held; what the body added goes.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(Failed), interop.removed_on_failure(tmp_path / "out"):
        (tmp_path / "out" / "variables").mkdir()
        (tmp_path / "out" / "variables" / "x").write_text("partial")
        raise Failed
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]

    # A file that existed stays; one the body creates goes; without failure, everything stays.
    (tmp_path / "old.pth").write_text("old")
    with pytest.raises(Failed), interop.removed_on_failure(tmp_path / "old.pth"):
        raise Failed
    with pytest.raises(Failed), interop.removed_on_failure(tmp_path / "new.pth"):
        (tmp_path / "new.pth").write_text("partial")
        raise Failed
    with interop.removed_on_failure(tmp_path / "done.pth"):
        (tmp_path / "done.pth").write_text("whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done.pth", "old.pth", "out"]
    assert (tmp_path / "old.pth").read_text() == "old"


def test_save_state_dict_writes_a_whole_file_or_none(tmp_path, monkeypatch):
    state_dict = _state_dict("resnet10")
    interop.save_state_dict(state_dict, tmp_path / "a.pth")
    assert list(torch.load(tmp_path / "a.pth", weights_only=True)) == list(state_dict)

    def full_disk(obj, f):
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    before = (tmp_path / "a.pth").read_bytes()
    for name in ("a.pth", "b.pth"):
        with pytest.raises(OSError, match="No space left"):
            interop.save_state_dict(state_dict, tmp_path / name)
    assert [p.name for p in tmp_path.iterdir()] == ["a.pth"]  # no b.pth, no partial file
    assert (tmp_path / "a.pth").read_bytes() == before


@pytest.mark.slow
def test_script_writes_nothing_that_fails_verification(tmp_path):
    """Exit 1 and no output, converting and exporting: verification runs before any write."""
    # fc weights 1e6 times too large: float32 rounding alone puts the logits ~1 apart.
    state_dict = _torch_model("resnet18").state_dict()
    state_dict["fc.weight"] *= 1e6
    torch.save(state_dict, tmp_path / "big.pth")
    done = _script("--model=resnet18", f"--weights={tmp_path / 'big.pth'}",
                   f"--out={tmp_path / 'ckpt'}", "--verify", "--image_size=32")  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "ABOVE 0.0001" in done.stdout and "verification failed" in done.stderr
    assert not (tmp_path / "ckpt").exists()

    config = variants.model_config("resnet18")
    checkpoint.save_variables(
        tmp_path / "big", interop.from_torchvision(state_dict, config), config
    )
    done = _script("--reverse", f"--checkpoint={tmp_path / 'big'}",
                   f"--out={tmp_path / 'back.pth'}", "--verify", "--image_size=32")  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "big.pth"]


@pytest.mark.slow
def test_script_damaged_pth_exits_2(tmp_path):
    damaged = {path.name: path for path in _damage(tmp_path)}
    for path in (damaged["half.pth"], damaged["empty.pth"]):
        done = _script("--model=resnet18", f"--weights={path}", f"--out={tmp_path / 'ckpt'}")
        assert done.returncode == 2, done.stderr
        assert f"{path} ({path.stat().st_size} bytes) looks truncated or corrupt" in done.stderr
        assert "Traceback" not in done.stderr and not (tmp_path / "ckpt").exists()
