# MNIST from the original IDX files (gzipped or not), flat or in torchvision's MNIST/raw layout.
_root = "data/mnist"
_norm = dict(mean=0.1307, std=0.3081)
data = dict(
    train=dict(name="mnist", kwargs=dict(root=_root, split="train"),
               transform=dict(name="classification", kwargs=dict(train=True, pad_crop=2, **_norm))),
    val=dict(name="mnist", kwargs=dict(root=_root, split="test"),
             transform=dict(name="classification", kwargs=dict(train=False, **_norm))),
    batch_size=128,
    num_workers=2,
    obtain_hint=(
        "download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
        "t10k-labels-idx1-ubyte.gz (e.g. from https://ossci-datasets.s3.amazonaws.com/mnist/, or run "
        "torchvision.datasets.MNIST('data/mnist', download=True)) into data/mnist, or pass "
        "--cfg-options data.root=FOLDER"),
)
model = dict(num_classes=10, input_shape=(1, 28, 28))
