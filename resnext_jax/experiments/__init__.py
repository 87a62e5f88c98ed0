"""Experiments over runs: config files (config_files), sweeps (sweeps), tables and plots
(report), and the paper's published figures (paper)."""
