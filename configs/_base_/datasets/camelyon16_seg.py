# Camelyon16 (399 H&E whole slides of sentinel lymph nodes, .tif pyramids, 0.23-0.24 um/px at level 0) with the
# ASAP lesion annotations: training/{tumor,normal} for training, testing/images for evaluation.
# data.root is the folder that holds training/, lesion_annotations/ and testing/; the split is a glob relative
# to it or a .txt list file (one slide path or stem per line), e.g. data.train.kwargs.split=train.txt.
# Tumour segmentation on 256 px tiles of level 1 (~0.5 um/px) with >= 50% tissue; the tile index (tissue and
# tumour fractions per tile) is cached under cache_dir, so only the first epoch of the first run scans slides.
_norm = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
_tiles = dict(level=1, tile_size=256, min_tissue=0.5, mode="segment", cache_dir="data/camelyon_tile_cache")
data = dict(
    root="data/camelyon16",
    train=dict(name="camelyon16", kwargs=dict(split="training/*/*.tif", balance=0.5, epoch_size=20000, **_tiles),
               transform=dict(name="camelyon_tile", kwargs=dict(train=True, jitter=(0.1, 0.1), **_norm))),
    val=dict(name="camelyon16",
             kwargs=dict(split="testing/images/*.tif", annotation_dir="testing/lesion_annotations", **_tiles),
             transform=dict(name="camelyon_tile", kwargs=dict(train=False, **_norm))),
    batch_size=16,
    num_workers=4,
    obtain_hint=(
        "put Camelyon16 under data/camelyon16 so that data/camelyon16/training/tumor/tumor_001.tif ..., "
        "training/normal/normal_001.tif ..., lesion_annotations/tumor_001.xml ..., testing/images/test_001.tif ... "
        "and testing/lesion_annotations/test_001.xml ... exist (the CAMELYON16 folder of the Camelyon "
        "challenge data, https://camelyon17.grand-challenge.org/Data/, also on the AWS open data registry as "
        "s3://camelyon-dataset/CAMELYON16/; unzip lesion_annotations.zip in place), or keep it elsewhere and pass "
        "--cfg-options data.root=FOLDER. To try the pipeline on generated slides in the same layout: "
        "configs/demo_camelyon_seg_pce.py"),
)
