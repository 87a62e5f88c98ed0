"""Data sources: what they share (base), in-memory arrays (in_memory), image files
(image_source, preprocessing), TFDS (tfds_source), the dispatcher on top (sources), and a
split's examples checked before a run (checks, for scripts/check_dataset.py)."""
