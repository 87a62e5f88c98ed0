"""resnext_jax.bench.profile (scripts/profile_step.py): ops attributed to layers and passes."""

import collections

from resnext_jax.bench import profile

HLO = """
  %ffi_call.7 = f32[2,8,8,16]{3,2,1,0} custom-call(%p0, %p1), custom_call_target="resnext_onednn_conv_forward", metadata={op_name="jit(train_step)/jvp(ResNet)/stage1_block0/conv2/ffi_call"}
  %fusion.3 = f32[2,8,8,16]{3,2,1,0} fusion(%a), kind=kLoop, metadata={op_name="jit(train_step)/transpose(jvp(ResNet))/stage1_block0/bn2/mul"}
  %ffi_call.9 = f32[2,4,4,16]{3,2,1,0} custom-call(%x), custom_call_target="resnext_onednn_pool_forward", metadata={op_name="jit(train_step)/jvp(ResNet)/ffi_call"}
  ROOT %all-reduce.1 = f32[10]{0} all-reduce(%g), replica_groups={}, metadata={op_name="jit(train_step)/psum"}
  %fusion.4 = f32[10]{0} fusion(%g), kind=kLoop, metadata={op_name="jit(train_step)/add"}
"""  # noqa: E501


def test_ops_are_attributed_to_their_layer_and_pass():
    layers = profile.instruction_layers(HLO)
    assert layers == {
        "ffi_call.7": ("conv2", "forward"),
        "fusion.3": ("batch norm", "backward"),
        "ffi_call.9": ("max pool", "forward"),
        "all-reduce.1": ("collectives", "rest"),
        "fusion.4": ("other", "rest"),
    }
    assert set(profile.instruction_layers(HLO, train=False).values()) >= {("conv2", "forward")}
    events = [
        {"ph": "X", "name": "ffi_call.7", "dur": 3000},
        {"ph": "X", "name": "ffi_call.7", "dur": 1000},
        {"ph": "X", "name": "unknown", "dur": 5000},
        {"ph": "i", "name": "ffi_call.7"},
    ]
    assert profile.attribute(events, layers) == collections.Counter({("conv2", "forward"): 4.0})


def test_a_tiny_model_is_profiled_layer_by_layer(capsys):
    assert profile.main(["--models=resnet18", "--batch=2", "--res=32", "--reps=1"]) == 0
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in out.splitlines()
            if line.startswith("| ")}  # fmt: skip
    assert rows["layer"][:4] == ["resnet18 forward", "resnet18 backward", "resnet18 rest",
                                 "resnet18 total |"]  # fmt: skip
    for layer in ("conv1", "conv2", "batch norm", "stem_conv", "ops, summed"):
        forward, backward, _, total = (float(c.strip(" |") or 0) for c in rows[layer])
        assert forward > 0 and backward > 0 and total >= forward + backward - 0.2, layer
    assert float(rows["step, wall"][-1].strip(" |")) > 0
