"""Time batch norm with its ReLU in jax.numpy and through oneDNN; print a markdown table.

    python scripts/bench_norm.py

Shapes and columns: resnext_jax/bench/norm.py.
"""

from resnext_jax.bench import norm
from resnext_jax.devices import runtime

if __name__ == "__main__":
    runtime.use_tcmalloc()
    norm.main()
