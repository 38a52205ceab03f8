# PCE classifier on the pce_tiny preset, adapted to 64x64 inputs (Tiny ImageNet): stem stride 2 and patch
# sizes 8/4/4/2 give 4x4, 4x4, 2x2 and 2x2 patch grids on the 32/16/8/4 maps; deformable attention in stage 3.
task = "classification"
model = dict(
    backbone="pce_tiny",
    num_classes=200,
    backbone_overrides=dict(
        stem_stride=2,
        stages=[
            dict(channels=32, depth=1, patch_size=8, stride=1),
            dict(channels=64, depth=1, patch_size=4, stride=2),
            dict(channels=128, depth=1, patch_size=4, stride=2, attention=True),
            dict(channels=256, depth=1, patch_size=2, stride=2),
        ],
    ),
    head=dict(spp_levels=(1, 2, 4), dropout=0.2),
    router_loss_weights=dict(entropy=0.0, balance=0.01, z=0.001, collapse=0.0),
    label_smoothing=0.1,
    input_shape=(3, 64, 64),
)
