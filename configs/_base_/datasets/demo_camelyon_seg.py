# Generated whole slides in the Camelyon16 layout (pce.datasets.camelyon.synthetic; written into data/demo_camelyon
# on first use: 8 tumour + 4 normal training slides, 3 tumour + 1 normal test slides, 2048 x 1536 px at level 0,
# 2 um/px, 4 levels). Tumour segmentation on 128 px tiles of level 1 (downsample 2) with >= 50% tissue.
# Training: stride 64 (overlapping tiles), 400 draws per epoch, half of them tumour tiles (balance=0.5).
_norm = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
_tiles = dict(level=1, tile_size=128, min_tissue=0.5, mode="segment", cache_dir="data/camelyon_tile_cache")
data = dict(
    root="data/demo_camelyon",
    train=dict(name="camelyon16",
               kwargs=dict(split="training/*/*.tif", stride=64, balance=0.5, epoch_size=400, generate=True, **_tiles),
               transform=dict(name="camelyon_tile", kwargs=dict(train=True, jitter=(0.1, 0.1), **_norm))),
    val=dict(name="camelyon16",
             kwargs=dict(split="testing/images/*.tif", annotation_dir="testing/lesion_annotations", stride=64,
                         generate=True, **_tiles),
             transform=dict(name="camelyon_tile", kwargs=dict(train=False, **_norm))),
    batch_size=8,
    num_workers=0,  # reading a 128 px tile takes ~0.5 ms: worker processes would cost more than they save here
)
