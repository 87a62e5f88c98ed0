"""The published figures this project prints beside its own (reference/paper_tables.json)."""

import functools
import json
import pathlib
import re

_TABLES = pathlib.Path(__file__).parent / "reference" / "paper_tables.json"


@functools.cache
def tables() -> dict:
    return json.loads(_TABLES.read_text())


def figures(name: str) -> dict:
    """The paper's (or torchvision's) params, multiply-adds, conv2 width and top-1 error."""
    t = tables()
    out = {}
    m = re.fullmatch(r"res(?:ne)?xt?(\d+)_(\d+x\d+d)", name) or re.fullmatch(r"resnet(\d+)", name)
    depth = m[1] if m else None
    cw = (m[2] if m.lastindex == 2 else "1x64d") if m else None
    if name in t["exact_param_counts_1000_classes"]:
        out["params"] = t["exact_param_counts_1000_classes"][name]
    elif name in t["table7_cifar_test_error"]:
        out["params"] = t["table7_cifar_test_error"][name]["params"]
    if name in t["table1_complexity"]:
        out["flops"] = t["table1_complexity"][name]["flops_multiply_adds"]
    elif depth in t["table3_top1_error"] and cw in t["table3_top1_error"][depth]:
        out["flops"] = t["table3_complexity_flops_multiply_adds"][depth]
    if depth in t["table3_top1_error"] and cw in t["table3_top1_error"][depth]:
        out["conv2_group_width"] = t["table2_group_width_conv2"][cw]
        out["top1_error"] = t["table3_top1_error"][depth][cw]
    table4 = t["table4_2x_complexity_top1_top5_error"]
    key = f"resnet{depth}_1x64d" if cw == "1x64d" else name
    if "top1_error" not in out and key in table4:
        out["top1_error"] = table4[key][0]
    return out
