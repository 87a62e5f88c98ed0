"""How the code runs on devices: XLA options (runtime) and data parallelism (parallel)."""
