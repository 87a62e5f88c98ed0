"""Input pipeline throughput: our image-folder pipeline beside torchvision's, same files, same work.

    python scripts/benchmark_input.py                      # 320 JPEGs, 2 workers, markdown
    python scripts/benchmark_input.py --workers=4 --images=600 --format=json

What both pipelines do and how they are timed: resnext_jax/bench/input.py.
"""

from resnext_jax.bench import input as input_bench

if __name__ == "__main__":
    input_bench.main()
