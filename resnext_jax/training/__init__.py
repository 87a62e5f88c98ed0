"""Training: the compiled steps (steps), the loop (loop), optimizer (optim), checkpoints
(checkpoint), a run's files (logs), and SIGTERM handling (preemption)."""
