"""ResNet and ResNeXt (Xie et al. 2017) in JAX/Flax, from one CPU to a pod.

Subpackages, each importing only from the ones listed before it (docs/architecture.md):

    devices      XLA options, the device mesh, per-device steps, joining a multi-process run
    ops          the conv layer and its implementations (XLA formulations, oneDNN)
    models       ResNet/ResNeXt, named variants, the layer inspector, torchvision weights
    data         data sources: Fashion-MNIST and synthetic arrays, image files, TFDS
    training     steps, the loop, optimizer, checkpoints, a run's logs, preemption
    experiments  config files, sweeps, report tables and plots, the paper's figures
    bench        model, conv and input-pipeline benchmarks
"""
