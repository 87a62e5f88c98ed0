"""Convolution: the layer every block uses (conv) and how it runs (xla_convs, onednn)."""
