"""Where a compiled step spends its time, layer by layer (a profiler trace); a markdown table.

    python scripts/profile_step.py --models=resnet50,resnext50_32x4d --batch=16 --res=224

Layers, passes and columns: resnext_jax/bench/profile.py.
"""

import sys

from resnext_jax.bench import profile
from resnext_jax.devices import runtime

if __name__ == "__main__":
    runtime.use_tcmalloc()
    sys.exit(profile.main())
