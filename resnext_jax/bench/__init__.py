"""Benchmarks: models (beside torchvision), grouped convs, input pipelines; scripts/ runs them."""
