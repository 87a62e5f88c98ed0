"""Time each grouped-conv implementation and print a markdown table.

    python scripts/bench_grouped_conv.py --shapes resnext50 --impls shift,matmul,dense
    python scripts/bench_grouped_conv.py --shapes 16x56x56x128:g32:k3:s1 --parts
    python scripts/bench_grouped_conv.py --shapes resnet50_1x1 --impls pointwise --parts

Shapes, shape sets and columns: resnext_jax/bench/conv.py.
"""

from resnext_jax.bench import conv
from resnext_jax.devices import runtime

if __name__ == "__main__":
    runtime.use_tcmalloc()
    conv.main()
