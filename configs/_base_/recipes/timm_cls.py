# timm's classification training recipe (issue #24), through timm itself: RandAugment ("rand-m9-mstd0.5",
# timm.data.auto_augment) and random erasing (timm.data.RandomErasing) in the train transform, Mixup + CutMix
# (timm.data.Mixup; SoftTargetCrossEntropy against the mixed targets, smoothed by model.label_smoothing) and
# stochastic depth (timm.layers.DropPath, rates growing linearly over the layers up to drop_path_rate).
# drop_last: Mixup pairs images, so every batch is even (an odd batch would be trained unmixed).
model = dict(backbone_overrides=dict(drop_path_rate=0.1))
data = dict(
    train=dict(transform=dict(kwargs=dict(auto_augment="rand-m9-mstd0.5",
                                          random_erasing=dict(probability=0.25, mode="pixel")))),
    mixup=dict(mixup_alpha=0.2, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch"),
    drop_last=True,
)
