"""Data sources: what they share (base), in-memory arrays (in_memory), image files
(image_source, preprocessing), TFDS (tfds_source), and the dispatcher on top (sources)."""
