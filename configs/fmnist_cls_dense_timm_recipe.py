# The dense twin of fmnist_cls_pce_timm_recipe.py: fmnist_cls_dense.py with the same timm recipe.
#   python tools/train.py configs/fmnist_cls_dense_timm_recipe.py --seed 0
_base_ = ["./fmnist_cls_dense.py", "./_base_/recipes/timm_cls.py"]
