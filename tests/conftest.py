"""The tests run on the CPU and offline, also on a machine with a CUDA GPU and a network: their
exact-resume and bit-identity checks assume the CPU (CI has no GPU), `--device auto` must not pick
the GPU behind their back, and nothing may be downloaded (weights come from files or the cache)."""
import os

os.environ['CUDA_VISIBLE_DEVICES'] = ''     # this process and every torchrun / subprocess it starts
os.environ['HF_HUB_OFFLINE'] = '1'          # timm / huggingface_hub: the cache only
