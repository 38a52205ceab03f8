# The built-in demo detection data: procedurally drawn shapes written in the exact VOC format
# (generated into data/demo_voc on first use; tools/make_demo_data.py does the same by hand).
_demo = dict(num_train=400, num_val=100, image_size=128, seed=0)
_tf = dict(min_size=128, max_size=128)
data = dict(
    root="data/demo_voc",
    train=dict(name="voc_detection", kwargs=dict(year="2007", image_set="train", demo=_demo),
               transform=dict(name="voc_detection", kwargs=dict(_tf, hflip=0.5, scale_range=(0.8, 1.2)))),
    val=dict(name="voc_detection", kwargs=dict(year="2007", image_set="val", demo=_demo),
             transform=dict(name="voc_detection", kwargs=dict(_tf))),
    batch_size=8,
    num_workers=2,
)
