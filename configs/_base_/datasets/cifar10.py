# CIFAR-10 from the official "python version" batches (cifar-10-batches-py).
_root = "data/cifar10"
_norm = dict(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
data = dict(
    train=dict(name="cifar10", kwargs=dict(root=_root, split="train"),
               transform=dict(name="classification",
                              kwargs=dict(train=True, pad_crop=4, hflip=True,
                                          channel_shift=dict(shift_range=(0.05, 0.15), p=0.3), **_norm))),
    val=dict(name="cifar10", kwargs=dict(root=_root, split="test"),
             transform=dict(name="classification", kwargs=dict(train=False, **_norm))),
    batch_size=128,
    num_workers=4,
    obtain_hint=(
        "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it into data/cifar10 "
        "(giving data/cifar10/cifar-10-batches-py), or pass --cfg-options data.root=FOLDER"),
)
model = dict(num_classes=10, input_shape=(3, 32, 32))
