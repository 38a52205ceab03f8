# The built-in demo segmentation data: the same procedurally drawn VOC-format dataset as the detection demo
# (palette PNG masks with 255 borders; generated into data/demo_voc on first use).
_demo = dict(num_train=400, num_val=100, image_size=128, seed=0)
_norm = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
data = dict(
    root="data/demo_voc",
    train=dict(name="voc_segmentation", kwargs=dict(year="2007", image_set="train", demo=_demo),
               transform=dict(name="voc_segmentation",
                              kwargs=dict(train=True, crop_size=128, scale_range=(0.75, 1.25), hflip=0.5, **_norm))),
    val=dict(name="voc_segmentation", kwargs=dict(year="2007", image_set="val", demo=_demo),
             transform=dict(name="voc_segmentation", kwargs=dict(train=False, **_norm))),
    batch_size=8,
    num_workers=2,
)
