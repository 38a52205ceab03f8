# Issue #26 pce_tiny_shrink's rule on 28 px (pce/models/presets.py): patch footprints 14, 8, 4 px shrinking with
# depth instead of fmnist_cls_pce.py's stages (every other setting of the PCE recipe unchanged).
_base_ = ["../fmnist_cls_pce.py"]
model = dict(backbone_overrides=dict(stages=[dict(channels=48, patch_size=7, stride=2),
                                             dict(channels=48, patch_size=4, stride=1),
                                             dict(channels=48, patch_size=2, stride=1)]))
