# PCE encoder + segmentation-models-pytorch FPN decoder on the built-in demo data.
#   python tools/train.py configs/demo_seg_pce.py
_base_ = ["_base_/datasets/demo_voc_seg.py", "_base_/default_runtime.py"]
task = "segmentation"
model = dict(
    backbone="pce_tiny",
    num_classes=5,  # background + 4 demo classes
    # Experts in the two deep stages (128 and 256 channels: 94% of the expert weights), dense layers in the two
    # early ones, whose experts would hold 6% of the extra capacity. Within noise of the dense twin over 5 seeds;
    # experts in all four stages (configs/demo_seg_pce_allstages.py) were 1.6 points behind (docs/RESULTS.md).
    # execution="context": every pixel computed by its patch's expert, convolutions reading across patch borders
    # (dense-equal FLOPs; halo=1 gave the same accuracy at 1.9x the FLOPs). "straight_through": the top-1 weight
    # is 1 in the forward pass (upcycled experts start as the shared block exactly), router gradients as usual.
    backbone_overrides=dict(
        num_experts=4, top_k=1, execution="context", router_kwargs=dict(renormalize="straight_through"),
        stages=[
            dict(channels=32, depth=1, patch_size=16, stride=1, layer="dense"),
            dict(channels=64, depth=1, patch_size=8, stride=2, layer="dense"),
            dict(channels=128, depth=1, patch_size=4, stride=2),
            dict(channels=256, depth=1, patch_size=2, stride=2),
        ]),
    head=dict(arch="FPN", decoder=dict(decoder_pyramid_channels=64, decoder_segmentation_channels=32)),
    input_shape=(3, 128, 128),
)
optimizer = dict(type="adamw", lr=2e-3, weight_decay=1e-4, grad_clip=10.0)
schedule = dict(epochs=32, lr_scheduler=dict(type="cosine", warmup_epochs=0.5))
# Sparse upcycling: 16 epochs with every patch sent to expert 0 (one shared block, the cost of one expert), then
# expert 0 is copied into all experts and the learned routers take over (keys EMA-updated, then trainable).
phases = [
    dict(name="shared", epochs=16, router_override="shared", keys_trainable=False),
    dict(name="route", epochs=6, upcycle=True, keys_trainable=False),
    dict(name="finetune", epochs=-1, keys_trainable=True),
]
runtime = dict(kmeans_init_batches=8, log_interval=10)
eval = dict(metric="mIoU", mode="max")
