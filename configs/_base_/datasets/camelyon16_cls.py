# Camelyon16 tumour / normal tile classification (as PatchCamelyon: a tile is tumour when its central third holds
# tumour): 96 px tiles of level 2 (~1 um/px, 10x), >= 50% tissue; same layout and obtain_hint as camelyon16_seg.
_base_ = ["camelyon16_seg.py"]
_tiles = dict(level=2, tile_size=96, mode="classify")
data = dict(
    train=dict(kwargs=dict(**_tiles, epoch_size=50000)),
    val=dict(kwargs=dict(**_tiles)),
    batch_size=64,
)
