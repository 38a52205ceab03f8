# PCE Faster R-CNN on the built-in demo data (`make demo FULL=1`; `make demo` runs demo_det_pce_quick.py).
#   python tools/train.py configs/demo_det_pce.py
# The recipe (_base_/schedules/demo_det_phased.py): AdamW, 24 epochs; 1 epoch of stabilisation (one random expert
# per patch), then learned routing with K-Means keys, then trainable keys.
_base_ = ["_base_/models/frcnn_demo.py", "_base_/datasets/demo_voc_det.py", "_base_/default_runtime.py",
          "_base_/schedules/demo_det_phased.py"]
