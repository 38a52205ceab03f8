"""PCE dataset adapters (installed as ``pce.datasets``); importing this registers them all.

Add a module by importing its public names below; registration happens via the
``@DATASETS.register`` / ``@TRANSFORMS.register`` decorators in each module.
"""

from .registry import DATASETS, TRANSFORMS, Registry, build_dataset, build_transform
from .idx import MNIST, FashionMNIST, read_idx
from .cifar import CIFAR10, CIFAR100
from .tiny_imagenet import TinyImageNet
from .digits import Digits
from .transforms import ClassificationTransform, RaiseOneChannel
