# Tiny ImageNet (200 classes, 64x64): train split for training, the labelled val split for evaluation.
_root = "data/tiny-imagenet-200"
_norm = dict(mean=(0.480, 0.448, 0.398), std=(0.277, 0.269, 0.282))
data = dict(
    train=dict(name="tiny_imagenet", kwargs=dict(root=_root, split="train"),
               transform=dict(name="classification",
                              kwargs=dict(train=True, size=64, scale=(0.35, 1.0), hflip=True,
                                          black_patches=dict(num_holes_range=(1, 2), p=0.25), **_norm))),
    val=dict(name="tiny_imagenet", kwargs=dict(root=_root, split="val"),
             transform=dict(name="classification", kwargs=dict(train=False, size=64, **_norm))),
    batch_size=128,
    num_workers=8,
    obtain_hint=(
        "download http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it into data/ "
        "(giving data/tiny-imagenet-200/wnids.txt), or pass --cfg-options data.root=FOLDER"),
)
model = dict(num_classes=200, input_shape=(3, 64, 64))
