# Camelyon16 tumour / normal tile classification (as PatchCamelyon: a tile is tumour when its central third holds
# tumour): 96 px tiles at 1.0 um/px (10x; level 2 of a 40x slide is 0.90-0.97 um/px and is resampled), >= 50%
# tissue; same layouts, splits (validation holdout of the training slides, test slides for tools/eval.py only)
# and obtain_hint as camelyon16_seg.
_base_ = ["camelyon16_seg.py"]
_tiles = dict(mpp=1.0, tile_size=96, mode="classify")
data = dict(
    train=dict(kwargs=dict(**_tiles, epoch_size=50000)),
    val=dict(kwargs=dict(**_tiles)),
    test=dict(kwargs=dict(**_tiles)),
    batch_size=64,
)
