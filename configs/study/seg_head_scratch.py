# Issue #26, experts that differ from the start: configs/demo_seg_patchmoe.py's PCEConv2d at the decoder's last
# convolution with no shared phase and experts drawn far apart (noise=1.0: each kernel is the dense classifier
# plus Gaussian noise of its own standard deviation, about as far from it as a fresh initialisation), so that no
# upcycled copy can survive training (with noise=0.01, configs/study/seg_head_noshared.py, the four kernels still
# had cosine 0.991-0.997 after 32 epochs).
#   python tools/train.py configs/study/seg_head_scratch.py --seed 0
_base_ = ["../demo_seg_patchmoe.py"]
model = dict(convert=[dict(target="net.segmentation_head.0", num_experts=4, top_k=2, grid=3, router="gap_conv",
                           execution="context", noise=1.0)])
phases = [dict(name="route", epochs=-1)]
