# Tumour segmentation on generated whole slides (the built-in pathology demo; see docs/CAMELYON.md):
# PCE encoder + smp FPN, 128 px tiles of level 1. Runs from a fresh clone on a CPU in a few minutes.
#   python tools/train.py configs/demo_camelyon_seg_pce.py
#   python tools/eval.py configs/demo_camelyon_seg_pce.py --checkpoint work_dirs/demo_camelyon_seg_pce/best.pth
#   python tools/infer_slide.py configs/demo_camelyon_seg_pce.py --checkpoint work_dirs/demo_camelyon_seg_pce/best.pth \
#       data/demo_camelyon/testing/images/test_001.tif --out out/heatmap
# The recipe of configs/demo_seg_pce.py: experts (4, top-1 cosine routing, context execution) in stages 3-4 only,
# a shared phase followed by sparse upcycling, then routing with EMA keys and trainable keys.
_base_ = ["_base_/datasets/demo_camelyon_seg.py", "_base_/default_runtime.py"]
task = "segmentation"
model = dict(
    backbone="pce_tiny",
    num_classes=2,  # background, tumour
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
schedule = dict(epochs=12, lr_scheduler=dict(type="cosine", warmup_epochs=0.5))
phases = [
    dict(name="shared", epochs=6, router_override="shared", keys_trainable=False),
    dict(name="route", epochs=2, upcycle=True, keys_trainable=False),
    dict(name="finetune", epochs=-1, keys_trainable=True),
]
# One CPU thread (as configs/demo_cls_digits.py): on a busy 2-core machine torch's spinning thread pool costs far
# more than a second thread gains on 128 px tiles.
runtime = dict(kmeans_init_batches=8, log_interval=10, eval_interval=2, num_threads=1)
eval = dict(metric="mIoU", mode="max")
