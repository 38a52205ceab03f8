# PCE classifier for 28x28 grey images: the pce_fmnist preset (3 stages, 4 experts, top-1 cosine routing).
task = "classification"
model = dict(
    backbone="pce_fmnist",
    num_classes=10,
    backbone_overrides=dict(),
    head=dict(spp_levels=(1, 2, 4), dropout=0.0),
    router_loss_weights=dict(entropy=0.0, balance=0.01, z=0.001, collapse=0.0),
    label_smoothing=0.0,
    input_shape=(1, 28, 28),
)
