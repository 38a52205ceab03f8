# scikit-learn's bundled 8x8 handwritten digits (1797 images, no download), upsampled to 16x16;
# stratified 75/25 train/test split. Digits has no separate validation set: val and test are the test split.
_norm = dict(mean=0.305, std=0.319)
_eval = dict(name="digits", kwargs=dict(split="test", size=16, seed=0),
             transform=dict(name="classification", kwargs=dict(train=False, **_norm)))
data = dict(
    train=dict(name="digits", kwargs=dict(split="train", size=16, seed=0),
               transform=dict(name="classification", kwargs=dict(train=True, pad_crop=1, **_norm))),
    val=_eval,
    test=_eval,
    batch_size=32,
    num_workers=0,
)
model = dict(num_classes=10, input_shape=(1, 16, 16))
