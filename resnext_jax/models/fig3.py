"""Fig. 3 of the paper: mapping form (c)'s grouped parameters onto forms (a) and (b).

Form (c) holds, per bottleneck, conv1 (1x1, in -> C*d), conv2 (3x3 grouped, kernel
(3, 3, d, C*d)), conv3 (1x1, C*d -> out) and their BNs. Path i of forms (a) and (b) is
channel slice [i*d, (i+1)*d) of conv1/bn1/conv2/bn2: group i of the grouped conv reads
exactly the channels conv1 wrote there. Form (b) keeps conv3 whole (a 1x1 over the
concatenated paths); form (a) gives path i rows [i*d, (i+1)*d) of conv3, and summing the
paths' outputs equals that 1x1 over the concatenation.
"""

import numpy as np

_SPLIT_PER_PATH = ("conv1", "bn1", "conv2", "bn2")


def grouped_to_form(variables, form: str):
    """Variables ({"params": ..., "batch_stats": ...}) of a form-(c) model, for `form`."""
    if form == "grouped":
        return variables
    if form not in ("paths", "concat"):
        raise ValueError(f"unknown form {form!r}; choose 'grouped', 'paths' or 'concat'")
    params = variables["params"]
    return {collection: _map_blocks(tree, params, form) for collection, tree in variables.items()}


def _map_blocks(tree, params, form):
    """Walk `tree` beside `params`; split every bottleneck (a block with a conv3)."""
    if not isinstance(tree, dict):
        return tree
    if "conv3" in params:
        kernel = np.shape(params["conv2"]["kernel"])
        return _split_block(tree, form, d=kernel[2], cardinality=kernel[3] // kernel[2])
    return {k: _map_blocks(v, params.get(k, {}), form) for k, v in tree.items()}


def _split_block(block, form, d, cardinality):
    out = {k: v for k, v in block.items() if k not in _SPLIT_PER_PATH}
    for i in range(cardinality):
        path = {
            name: {k: v[..., i * d : (i + 1) * d] for k, v in block[name].items()}
            for name in _SPLIT_PER_PATH
            if name in block
        }
        if form == "paths" and "conv3" in block:
            path["conv3"] = {"kernel": block["conv3"]["kernel"][:, :, i * d : (i + 1) * d, :]}
        out[f"path{i}"] = path
    if form == "paths":
        out.pop("conv3", None)
    return out
