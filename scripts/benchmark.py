"""Training or inference throughput of our Flax models on synthetic data, beside torchvision's.

    python scripts/benchmark.py --models=resnet50,resnext50_32x4d --batch=16 --mode=train --torch
    python scripts/benchmark.py --models=fashion_mnist,resnext29_8x64d --mode=infer --format=json
    python scripts/benchmark.py --models=resnext50_32x4d --impl=auto,xla_auto,shift
    python scripts/benchmark.py --models=resnet50,resnext50_32x4d --batch=8 --devices=1,2
    python scripts/benchmark.py --models=resnet152,resnet200 --batch=8 --torch --max-workers=2

Each row runs in its own worker process, at most --max-workers of them alive at once; how rows
are timed side by side, and what a dead worker does to the table, is in
resnext_jax/bench/models.py. The exit status is 1 where a row's worker failed.
"""

import sys

from resnext_jax.bench import models
from resnext_jax.devices import runtime

if __name__ == "__main__":
    runtime.use_tcmalloc()
    sys.exit(models.main())
