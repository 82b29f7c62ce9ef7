"""The tests run on the CPU, also on a machine with a CUDA GPU: their exact-resume and bit-identity
checks assume it (CI has no GPU), and `--device auto` must not pick the GPU behind their back."""
import os

os.environ['CUDA_VISIBLE_DEVICES'] = ''     # this process and every torchrun / subprocess it starts
