# COCO-format detection data: one COCO JSON per split plus an image folder (pce.datasets.COCODetection). The
# defaults are COCO 2017's own layout; for your own data (a CVAT / Label Studio / Roboflow export) point the keys
# at your files, e.g. --cfg-options data.root=data/mine data.train.kwargs.ann_file=annotations/train.json
# data.train.kwargs.img_dir=images model.num_classes=<categories + 1>. masks=True also reads the instance masks.
_tf = dict(min_size=600, max_size=1000)
data = dict(
    root="data/coco",
    train=dict(name="coco_detection",
               kwargs=dict(ann_file="annotations/instances_train2017.json", img_dir="train2017", remove_empty=True),
               transform=dict(name="voc_detection", kwargs=dict(_tf, hflip=0.5, scale_range=(0.8, 1.2)))),
    val=dict(name="coco_detection", kwargs=dict(ann_file="annotations/instances_val2017.json", img_dir="val2017"),
             transform=dict(name="voc_detection", kwargs=dict(_tf))),
    batch_size=8,
    num_workers=4,
    obtain_hint=(
        "put COCO-format data under data/coco: data/coco/annotations/instances_train2017.json and "
        "instances_val2017.json with the images in data/coco/train2017 and data/coco/val2017 (COCO 2017 unpacked "
        "there gives exactly that); for your own COCO JSON pass --cfg-options data.root=FOLDER "
        "data.train.kwargs.ann_file=... data.train.kwargs.img_dir=... (and the same for data.val) and "
        "model.num_classes=<number of categories + 1>"),
)
