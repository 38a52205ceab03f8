# PCE encoder + smp FPN: tumour segmentation on Camelyon16 (256 px tiles at 0.5 um/px; best.pth chosen on a
# validation holdout of the training slides, the test slides left to tools/eval.py).
#   python tools/train.py configs/camelyon16_seg_pce.py          # expects data/camelyon16 (see the dataset base)
#   torchrun --nproc_per_node=4 tools/train.py configs/camelyon16_seg_pce.py
#   python tools/eval.py configs/camelyon16_seg_pce.py --checkpoint work_dirs/camelyon16_seg_pce/best.pth --out m.json
# From scratch (no ImageNet weights): the demo recipe (configs/demo_camelyon_seg_pce.py) on pce_small, untuned on
# the real data. Experts in stages 3-4 with context execution, shared phase + sparse upcycling.
_base_ = ["_base_/datasets/camelyon16_seg.py", "_base_/default_runtime.py"]
task = "segmentation"
model = dict(
    backbone="pce_small",
    num_classes=2,  # background, tumour
    backbone_overrides=dict(
        num_experts=4, top_k=1, execution="context", router_kwargs=dict(renormalize="straight_through"),
        stages=[
            dict(channels=64, depth=1, patch_size=16, stride=1, layer="dense"),
            dict(channels=128, depth=1, patch_size=8, stride=2, layer="dense"),
            dict(channels=256, depth=2, patch_size=4, stride=2),
            dict(channels=512, depth=1, patch_size=2, stride=2),
        ]),
    head=dict(arch="FPN", decoder=dict(decoder_pyramid_channels=128, decoder_segmentation_channels=64)),
    input_shape=(3, 256, 256),
)
optimizer = dict(type="adamw", lr=1e-3, weight_decay=0.01, grad_clip=10.0)
schedule = dict(epochs=20, lr_scheduler=dict(type="cosine", warmup_epochs=1.0))
phases = [
    dict(name="shared", epochs=8, router_override="shared", keys_trainable=False),
    dict(name="route", epochs=4, upcycle=True, keys_trainable=False),
    dict(name="finetune", epochs=-1, keys_trainable=True),
]
runtime = dict(kmeans_init_batches=8, log_interval=50, eval_interval=2)
eval = dict(metric="mIoU", mode="max")
