"""The networks: ResNet/ResNeXt (resnet), named variants (variants), Fig. 3 forms (fig3),
the layer inspector (inspector), torchvision/timm weights (interop)."""
