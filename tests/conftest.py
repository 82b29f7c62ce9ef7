"""The tests run on the CPU and offline, also on a machine with a CUDA GPU and a network: their
exact-resume and bit-identity checks assume the CPU (CI has no GPU), `--device auto` must not pick
the GPU behind their back, and nothing may be downloaded (weights come from files or the cache)."""
import os

import pytest
import torch

os.environ['CUDA_VISIBLE_DEVICES'] = ''     # this process and every torchrun / subprocess it starts
os.environ['HF_HUB_OFFLINE'] = '1'          # timm / huggingface_hub: the cache only


@pytest.fixture
def randomise():
    """randomise(module, seed=0): every parameter drawn from N(0, 0.2^2), seeded. A fresh network's
    zero-initialised output convs make its residual blocks the identity, which hides their wiring."""
    def draw(module, seed=0):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        return module
    return draw


@pytest.fixture
def sinusoids():
    """sinusoids(t, half=4) -> (cos, sin), each (len(t), half): cos/sin(t f_i), f_i = 10000^(-i/half),
    computed in float64 from the closed form; each test concatenates them in its method's order."""
    def table(t, half=4):
        a = torch.tensor([[v * 10000 ** (-i / half) for i in range(half)] for v in t.tolist()], dtype=torch.float64)
        return a.cos().float(), a.sin().float()
    return table
