"""Models built from the blocks: the PCE layer, backbones and presets, the classifier, timm registration."""
