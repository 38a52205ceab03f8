# Generated whole slides in the Camelyon16 challenge layout (pce.datasets.camelyon.synthetic; written into
# data/demo_camelyon on first use: 8 tumour + 4 normal training slides, 3 tumour + 1 normal test slides,
# 2048 x 1536 px at level 0, 2 um/px, 4 levels). Tumour segmentation on 128 px tiles of level 1 (downsample 2,
# 4 um/px; every generated slide has the same pyramid, so a level index is safe here: the real configs use mpp=)
# with >= 50% tissue. Splits as configs/_base_/datasets/camelyon16_seg.py: train = the training slides less a
# seeded, stratified holdout of 25% (2 tumour + 1 normal slides) = val, validated on at most 2000 of their tiles;
# test = the test slides (tools/eval.py, tools/infer_slide.py). Training: stride 64 (overlapping tiles), 400 draws
# per epoch, half of them tumour tiles (balance=0.5).
_norm = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
_tiles = dict(level=1, tile_size=128, min_tissue=0.5, mode="segment", cache_dir="data/camelyon_tile_cache",
              stride=64, generate=True)
_split = dict(layout="challenge", holdout=0.25)
_eval_transform = dict(name="camelyon_tile", kwargs=dict(train=False, **_norm))
data = dict(
    root="data/demo_camelyon",
    train=dict(name="camelyon16", kwargs=dict(split="train", balance=0.5, epoch_size=400, **_split, **_tiles),
               transform=dict(name="camelyon_tile", kwargs=dict(train=True, jitter=(0.1, 0.1), **_norm))),
    val=dict(name="camelyon16", kwargs=dict(split="val", max_tiles=2000, max_tiles_tumour=0.5, **_split, **_tiles),
             transform=_eval_transform),
    test=dict(name="camelyon16", kwargs=dict(split="test", layout="challenge", **_tiles), transform=_eval_transform),
    batch_size=8,
    num_workers=0,  # reading a 128 px tile takes ~0.5 ms: worker processes would cost more than they save here
)
# The test slides are for tools/eval.py and tools/infer_slide.py: training never reads them (no final test score).
runtime = dict(final_test=False)
