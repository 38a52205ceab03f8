# PASCAL VOC detection, the standard protocol: VOC2007 trainval + VOC2012 trainval (16551 images) for training,
# VOC2007 test (4952 images) for evaluation; 20 classes (+ background). data.root is the folder that contains
# VOCdevkit (VOCdevkit/VOC2007, VOCdevkit/VOC2012).
_tf = dict(min_size=600, max_size=1000)
data = dict(
    root="data",
    train=dict(name="voc_detection", kwargs=dict(year=("2007", "2012"), image_set="trainval"),
               transform=dict(name="voc_detection", kwargs=dict(_tf, hflip=0.5, scale_range=(0.8, 1.2)))),
    val=dict(name="voc_detection", kwargs=dict(year="2007", image_set="test"),
             transform=dict(name="voc_detection", kwargs=dict(_tf))),
    batch_size=8,
    num_workers=4,
    obtain_hint=(
        "put PASCAL VOC under data/ so that data/VOCdevkit/VOC2007 (trainval + test) and data/VOCdevkit/VOC2012 "
        "(trainval) exist, each with Annotations/, ImageSets/Main/ and JPEGImages/: extracting "
        "VOCtrainval_06-Nov-2007.tar, VOCtest_06-Nov-2007.tar and VOCtrainval_11-May-2012.tar "
        "(http://host.robots.ox.ac.uk/pascal/VOC/) inside data/ gives exactly that; or keep VOCdevkit elsewhere "
        "and pass --cfg-options data.root=FOLDER (the folder that contains VOCdevkit). To try the pipeline on "
        "the built-in demo data instead (generated into data/demo_voc, VOC2007 format, 4 classes): "
        "python tools/train.py configs/voc_det_pce.py --cfg-options data.root=data/demo_voc model.num_classes=5 "
        "data.train.kwargs.demo=True data.train.kwargs.year=2007 data.train.kwargs.image_set=train "
        "data.val.kwargs.demo=True (configs/demo_det_pce.py is that detector sized for the demo's 128 px images)"),
)
