# PatchConvMoE upcycled from a TRAINED dense model (issue #26: upcycled vs trained from scratch): the converted
# model of configs/demo_seg_patchmoe.py, started from the dense twin's best checkpoint. model.pretrained is a
# checkpoint of the model before model.convert, so the trainer loads it into the dense model first and the
# conversion then copies the trained classifier net.segmentation_head.0 into all 4 experts (every other weight is
# the trained dense one; with noise=0 the model starts computing exactly the dense twin's function).
# Produce the checkpoint first, then fine-tune:
#   python tools/train.py configs/demo_seg_dense.py              # -> work_dirs/demo_seg_dense/best.pth
#   python tools/train.py configs/demo_seg_patchmoe_upcycled.py
# (another dense run: --cfg-options model.pretrained=work_dirs/<run>/best.pth)
# A shorter fine-tuning schedule at a quarter of the learning rate; the experts already are the trained kernel,
# so there is no shared phase: the learned gate routes from the first epoch.
_base_ = ["demo_seg_patchmoe.py"]
model = dict(pretrained="work_dirs/demo_seg_dense/best.pth")
optimizer = dict(lr=5e-4)
schedule = dict(epochs=8, lr_scheduler=dict(type="cosine", warmup_epochs=0.5))
phases = [dict(name="route", epochs=-1)]
