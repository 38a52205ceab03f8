# PCE classifier (backbone -> SPP -> FC): tumour / normal tiles of Camelyon16 (96 px at 1.0 um/px, label = tumour
# in the central third, as PatchCamelyon). tools/eval.py reports top1 (accuracy), AUC (tile AUC) and the
# confusion matrix.
#   python tools/train.py configs/camelyon16_cls_pce.py          # expects data/camelyon16 (see the dataset base)
#   python tools/eval.py configs/camelyon16_cls_pce.py --checkpoint work_dirs/camelyon16_cls_pce/best.pth --out m.json
_base_ = ["_base_/datasets/camelyon16_cls.py", "_base_/default_runtime.py"]
task = "classification"
model = dict(
    backbone="pce_tiny",
    num_classes=2,  # normal, tumour
    backbone_overrides=dict(num_experts=4, top_k=1),
    input_shape=(3, 96, 96),
)
optimizer = dict(type="adamw", lr=2e-3, weight_decay=0.05, grad_clip=10.0)
schedule = dict(epochs=12, lr_scheduler=dict(type="cosine", warmup_epochs=0.5))
phases = [
    dict(name="shared", epochs=4, router_override="shared", keys_trainable=False),
    dict(name="route", epochs=2, upcycle=True, keys_trainable=False),
    dict(name="finetune", epochs=-1, keys_trainable=True),
]
runtime = dict(kmeans_init_batches=8, log_interval=50)
eval = dict(metric="AUC", mode="max", topk=(1,))
