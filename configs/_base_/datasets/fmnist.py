# Fashion-MNIST from the original IDX files (gzipped or not).
_root = "/usr/share/datasets/fashion-mnist"
_norm = dict(mean=0.2860, std=0.3530)
data = dict(
    train=dict(name="fashion_mnist", kwargs=dict(root=_root, split="train"),
               transform=dict(name="classification", kwargs=dict(train=True, pad_crop=2, hflip=True, **_norm))),
    val=dict(name="fashion_mnist", kwargs=dict(root=_root, split="test"),
             transform=dict(name="classification", kwargs=dict(train=False, **_norm))),
    batch_size=128,
    num_workers=2,
    obtain_hint=(
        "download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
        "t10k-labels-idx1-ubyte.gz from https://github.com/zalandoresearch/fashion-mnist (folder data/fashion) into "
        "/usr/share/datasets/fashion-mnist (where the Debian package dataset-fashion-mnist installs them), or into "
        "any folder and pass --cfg-options data.root=FOLDER"),
)
model = dict(num_classes=10, input_shape=(1, 28, 28))
