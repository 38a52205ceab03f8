# Camelyon16 (399 H&E whole slides of sentinel lymph nodes, .tif pyramids, 0.226-0.243 um/px at level 0) with the
# ASAP lesion annotations. data.root holds the slides in one of two layouts, chosen by data.<split>.kwargs.layout
# (set it in all three splits):
#   "challenge": training/{tumor,normal}/*.tif, lesion_annotations/*.xml, testing/images/test_*.tif,
#                testing/lesion_annotations/test_*.xml (as the challenge distributed it)
#   "aws":       CAMELYON16/images/{normal,tumor,test}_*.tif, CAMELYON16/annotations/*.xml (s3://camelyon-dataset)
# Splits: train = the training slides less a validation holdout (by slide, stratified tumour / normal, seeded by
# the dataset's seed: runtime.seed when the task adapter passes it, else 0), val = that holdout (holdout=0.2, or a
# .txt / camelyon_split.json slide list), evaluated during training on a fixed subset of at most max_tiles tiles
# (half of them tumour tiles when there are enough, spread over the slides); test = the 129 test slides, for
# tools/eval.py (all their tissue tiles) and tools/infer_slide.py only: best.pth is never chosen on them.
# Resolution by microns per pixel: 256 px tiles at 0.5 um/px (each slide read from its closest finer-or-equal
# level and resampled: level 1 of a 40x slide is 0.452-0.486 um/px, so its 263-283 px are resized to 256) with
# >= 50% tissue; the tile index (tissue and tumour fractions per tile) is cached under cache_dir.
_norm = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
_tiles = dict(mpp=0.5, tile_size=256, min_tissue=0.5, mode="segment", cache_dir="data/camelyon_tile_cache")
_split = dict(layout="challenge", holdout=0.2)
# Stain: Macenko normalisation onto torchstain's reference for every tile (train, val, test, infer_slide) and light
# HED augmentation in training (docs/CAMELYON.md, "Stain").
_stain = dict(stain_norm="macenko")
_eval_transform = dict(name="camelyon_tile", kwargs=dict(train=False, **_stain, **_norm))
data = dict(
    root="data/camelyon16",
    train=dict(name="camelyon16", kwargs=dict(split="train", balance=0.5, epoch_size=20000, **_split, **_tiles),
               transform=dict(name="camelyon_tile", kwargs=dict(train=True, jitter=(0.1, 0.1), stain_aug=0.05, **_stain,
                                                                **_norm))),
    val=dict(name="camelyon16", kwargs=dict(split="val", max_tiles=2000, max_tiles_tumour=0.5, **_split, **_tiles),
             transform=_eval_transform),
    test=dict(name="camelyon16", kwargs=dict(split="test", layout="challenge", **_tiles), transform=_eval_transform),
    batch_size=16,
    num_workers=4,
    obtain_hint=(
        "put Camelyon16 under data/camelyon16 so that data/camelyon16/training/tumor/tumor_001.tif ..., "
        "training/normal/normal_001.tif ..., lesion_annotations/tumor_001.xml ..., testing/images/test_001.tif ... "
        "and testing/lesion_annotations/test_001.xml ... exist (the CAMELYON16 folder of the Camelyon "
        "challenge data, https://camelyon17.grand-challenge.org/Data/; unzip lesion_annotations.zip in place), or "
        "the AWS open-data copy (aws s3 sync --no-sign-request s3://camelyon-dataset/CAMELYON16 "
        "data/camelyon16/CAMELYON16, then --cfg-options data.train.kwargs.layout=aws data.val.kwargs.layout=aws "
        "data.test.kwargs.layout=aws), or keep it elsewhere and pass --cfg-options data.root=FOLDER. To try the "
        "pipeline on generated slides in the challenge layout: configs/demo_camelyon_seg_pce.py"),
)
# The test slides are for tools/eval.py and tools/infer_slide.py: training never reads them (no final test score).
runtime = dict(final_test=False)
