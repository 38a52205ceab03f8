# fmnist_cls_pce.py trained with timm's classification recipe (configs/_base_/recipes/timm_cls.py): RandAugment,
# random erasing, Mixup / CutMix with label smoothing 0.1, stochastic depth 0.1.
#   python tools/train.py configs/fmnist_cls_pce_timm_recipe.py --seed 0
_base_ = ["./fmnist_cls_pce.py", "./_base_/recipes/timm_cls.py"]
