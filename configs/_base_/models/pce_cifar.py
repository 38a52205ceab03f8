# PCE classifier for 32x32 colour images: the pce_cifar preset.
task = "classification"
model = dict(
    backbone="pce_cifar",
    num_classes=10,
    backbone_overrides=dict(),
    head=dict(spp_levels=(1, 2, 4), dropout=0.1),
    router_loss_weights=dict(entropy=0.0, balance=0.01, z=0.001, collapse=0.0),
    label_smoothing=0.1,
    input_shape=(3, 32, 32),
)
