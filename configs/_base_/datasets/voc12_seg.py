# PASCAL VOC 2012 semantic segmentation: train (1464 images) for training, val (1449 images) for evaluation;
# 21 classes (background included), 255 = void. data.root is the folder that contains VOCdevkit/VOC2012.
# data.train.kwargs.use_aug=True trains on the SBD-augmented set (SegmentationClassAug/, 10582 images) instead.
_norm = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
data = dict(
    root="data",
    train=dict(name="voc_segmentation", kwargs=dict(year="2012", image_set="train"),
               transform=dict(name="voc_segmentation",
                              kwargs=dict(train=True, crop_size=512, scale_range=(0.5, 2.0), hflip=0.5, **_norm))),
    val=dict(name="voc_segmentation", kwargs=dict(year="2012", image_set="val"),
             transform=dict(name="voc_segmentation", kwargs=dict(train=False, **_norm))),
    batch_size=8,
    num_workers=4,
    obtain_hint=(
        "put PASCAL VOC 2012 under data/ so that data/VOCdevkit/VOC2012 exists with JPEGImages/, "
        "SegmentationClass/ and ImageSets/Segmentation/{train,val}.txt: extracting VOCtrainval_11-May-2012.tar "
        "(http://host.robots.ox.ac.uk/pascal/VOC/) inside data/ gives exactly that; or keep VOCdevkit elsewhere "
        "and pass --cfg-options data.root=FOLDER (the folder that contains VOCdevkit). To try the pipeline on "
        "the built-in demo data instead (generated into data/demo_voc, VOC2007 format, 4 classes): "
        "python tools/train.py configs/voc_seg_pce.py --cfg-options data.root=data/demo_voc model.num_classes=5 "
        "data.train.kwargs.demo=True data.train.kwargs.year=2007 data.val.kwargs.demo=True "
        "data.val.kwargs.year=2007 (configs/demo_seg_pce.py is that model sized for the demo's 128 px images)"),
)
