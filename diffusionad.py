"""
DiffusionAD: Norm-guided One-step Denoising Diffusion for Anomaly Detection
(Zhang, Wang, Wu, Jiang; arXiv 2303.08730, 2023), a minimal re-implementation.

The idea. A pixel-space DDPM is trained on normal images only. At test time the image x0 is
noised twice, lightly (t_s) and heavily (t_b), and ONE U-Net call per noise level predicts the
noise. The heavy level drowns every anomaly, so its one-step reconstruction n is normal but
coarse; the light level keeps fine detail but also keeps large anomalies. Norm guidance pulls the
light-noise estimate towards n (it is a classifier-guidance-like correction of the predicted
noise), giving an anomaly-free yet detailed reconstruction x0_g. A DRAEM-style segmentation U-Net
then compares x0 with x0_g and outputs the anomaly map. Both networks are trained jointly on
normal images, half of them made anomalous with Perlin-shaped synthetic defects.

Implemented: Eq. 1 (forward process), Eq. 6 (one-step x0 from the predicted noise), Eqs. 7-8
(norm guidance), Eq. 9 (noise loss on normal samples only), Eqs. 10-11 (segmentation loss, total
loss), Eq. 12 (synthetic anomalies, via common.perlin_anomaly), and the top-K image score.
Eqs. 7-8 collapse to a blend (checked in the tests):
    x0_g = (1 - w (1 - abar_ts)) x0_s + w (1 - abar_ts) n,   x0_s = one-step estimate from x_ts,
so at the inference setting (t_s=200, w=1) the heavy-noise guide n has weight 0.344.

Choices where paper and official code (HuiZhang0812/DiffusionAD @8a64c03) differ or are silent:
- Input range: [0,1] in the paper preset, as the official code (which still clamps x0 estimates to
  [-1,1]); its fixed test timesteps t_s=200, t_b=400 were tuned with it. In [0,1] an image has half
  the amplitude it has in [-1,1], so the same t drowns more of it (SNR x1/4). The tiny preset uses
  [-1,1] (--input_range pm1): its briefly trained U-Net leaves noise in the one-step estimates,
  amplified by sqrt((1 - abar)/abar) on the way to x0, and in [-1,1] the same error costs half as
  much in image units (a scale argument; the validation proxy agrees: [0,1] lost 2.3 / 3.6 image /
  pixel AUROC points there on seed 0; no test-set number chose it). The timesteps stay the
  official ones: moving tau, t_s, t_b to the same SNR in [-1,1] (438, 331, 530) lost on the
  validation proxy (README).
- Eq. 9 without the 1/2 (official code): noise loss = mean over the normal samples (of the global
  batch under DDP) of the sum of the two MSEs; 0 (not NaN) when a batch has no normal sample. The
  segmentation loss is NOT detached from x0_g, so it trains the denoiser too (official code).
- Eq. 10: SmoothL1 (beta 1) on the sigmoid map + 5 x focal loss with focal gamma 4 and alpha 0.5
  (official BinaryFocalLoss); the paper's "gamma=5" is that weight. Computed from logits (same
  value, numerically safe, and allowed under bf16 autocast).
- Optimisers (official): Adam lr 1e-4 for the U-Net and 1e-5 for the segmentation net, whose LR
  follows CosineAnnealingLR(T_max=10) stepped every iteration, i.e. it oscillates between 1e-5 and
  0 with period 20 (the paper says Adam 1e-4 for everything). The tiny preset trains for minutes,
  not 3000 epochs: Adam 2e-3 / 3e-3, both annealed to 0 by one cosine over the run (--anneal).
  With a fast constant LR the BatchNorm running statistics lag behind the weights and the
  eval-mode maps are off (our first run: pixel AUROC on its own synthetic anomalies 0.61 in eval
  mode, 0.83 with batch statistics). It also starts the map at p = 0.01 instead of 0.5
  (--seg_prior, the RetinaNet initialisation for focal losses).
- Batch: each image becomes anomalous with p=0.5 (official), not a fixed 8+8 split (paper).
  Opacity beta ~ U(0.2, 0.8). Anomaly textures, as the official code, with --dtd_root: a DTD image
  for textures (the official list: MVTec's, zipper included, and DAGM's Class1-10 as --data folder
  names them, plus the synthetic weave and grain), for objects a DTD image or, half the time, a
  strip-shuffled copy of the image itself. Without DTD: common's procedural Perlin textures or
  strip-shuffled self copies, half and half.
- Foreground: the official code multiplies Perlin masks by precomputed DIS foregrounds (objects)
  or random-region masks (textures), which cannot be rebuilt here. --foreground uses a rough
  estimate for objects (colour distance to the border's median colour, holes filled; no
  restriction when it finds nothing) and no restriction on textures (by category name, since the
  estimate cannot tell a texture from an object). On by default in the paper preset, off in tiny:
  the synthetic objects' defects include excess material on the background.
- t_s ~ U{0..299}, t_b ~ U{300..999} per sample in training (official code; paper Sec. 4.2 writes
  {0..tau} and {tau+1..T}), and betas 1e-4..0.02 (official; the paper says 1e-4..1e-2);
  inference uses t_s=200, t_b=400, w=1 (official), with noise seeded per test image (the official
  evaluation noise is unseeded). One U-Net call on the batch [x_ts; x_tb] serves both levels.
- No checkpoint selection: the last weights are evaluated. The official code picks the "best"
  checkpoint on the TEST set every 50 epochs, so the paper's numbers are test-selected.
- An epoch is (training images // batch) steps, as the official drop_last loader (at least one),
  but of train/good minus the 10% validation split (--val_frac), which the official code trains on.
- U-Net: ADM layout as the official code (BigGAN up/down ResBlocks, attention at 32/16/8 px with
  4 heads, no scale-shift norm, no dropout, no EMA; the embedding is of the raw t). GroupNorm uses
  min(32, C/4) groups, so the tiny preset's 8-channel U-Net does not become instance norm (the
  paper preset is unchanged: 32 groups). The segmentation net is the DRAEM discriminative U-Net
  (6 levels of [conv-BN-ReLU]x2 from width 64, bilinear up-sampling), 6 input channels, 1 output.
- BatchNorm under DDP: SyncBatchNorm on CUDA; on CPU (gloo, where SyncBatchNorm does not run) the
  running statistics are averaged over ranks at every checkpoint (as timm's distribute_bn; the
  running update is linear, so this equals averaging every step): all ranks and the checkpoint
  hold the same ones; batch statistics then come from each rank's share, so keep >= 8 images per
  rank there.
- Tiny preset (CPU minutes; every value chosen by scale or on the VALIDATION split, never on the
  test set): the networks run at 48 px and eval.py upsamples the maps to eval_size (128 on
  synthetic); top-K scales K with the map area (50 at 256x256, 2 at 48x48). Levels scale with the
  size: U-Net 48/24/12/6 px with attention at the two coarsest (paper: the three coarsest of six),
  segmentation net 4 levels (6x6 bottleneck; paper 8x8). Batch 8 (spec's CPU setting, enough for
  BatchNorm). The step count is what the CPU budget allows: a U-Net step costs ~4/5 of the whole
  step, so resolution and U-Net width were traded for steps, on a validation proxy (val-split
  normals + 3 Perlin-anomalous copies each, maps scored at 128 px; image / pixel AUROC) at about
  the same CPU: 64 px, width 16, 600 steps 76.7 / 81.4; 48 px, width 16, 1000 steps 83.7 / 82.1;
  48 px, width 8, 2000 steps 88.5 / 83.9. The step count is what fits the 10-minute default run;
  on a later proxy (2 Perlin copies per val image), 1800 steps scored 93.1 / 92.4 (mean of seeds
  0-2), 2200 steps 96.4 / 93.5. Then the segmentation net, which decides the map (the proxy barely
  moves with t_s from 100 to 300), was widened at the cost of steps (seed 0): seg_ch 16, 2200
  steps 97.0 / 91.9; the same at 64 px, 1450 steps 91.7 / 88.7; seg_ch 32, 2200 steps 98.0 / 94.2
  (but 558 s of training); seg_ch 48, 1450 steps 96.2 / 93.1 (543 s); seg_ch 32, 1900 steps
  97.7 / 94.6, the tiny preset (~0.25 s a step; seeds 1 and 2: 97.5 / 95.1, 98.4 / 95.0). Spending
  the ~90 s the default run leaves unused on 2100 steps (with fused Adam) gained nothing: seeds 0
  and 1 scored 97.9 / 94.4 and 97.5 / 94.6 on the proxy, and 10-11 min of training on a day this
  machine ran ~20% slow. All of these were measured on an AMD EPYC with 2 threads; the CPU changes
  floating-point sums, so on another one the same seed trains another model (README).

$ python diffusionad.py                                      # tiny preset, synthetic data, CPU
$ python diffusionad.py --data mvtec --dtd_root data/dtd --train           # paper: each category
$ torchrun --standalone --nproc_per_node=4 diffusionad.py --data visa --category candle --train
$ python eval.py out/diffusionad_mvtec_each_paper_s0/bottle/ckpt.pt --t_s 150 --t_b 500
"""
import functools
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import ndimage
from tqdm import tqdm

import common

# -----------------------------------------------------------------------------
# config: defaults are the paper's settings; the presets below say where tiny differs

config = dict(
    common.BASE_CONFIG,
    # diffusion (paper Sec. 3, 5.1; values of the official code)
    T=1000,                  # diffusion steps
    betas=(1e-4, 0.02),      # linear beta schedule, first and last (official; paper Sec. 3 says beta_T = 1e-2)
    tau=300,                 # training: t_s ~ U{0..tau-1}, t_b ~ U{tau..T-1} (official; paper: {0..tau}, {tau+1..T})
    w=1.0,                   # norm-guidance scale of Eq. 7 (training and inference)
    t_s=200,                 # inference: small noise level (official eval_normal_t)
    t_b=400,                 # inference: big noise level, gives the guide n (official eval_noisier_t)
    top_k=50,                # image score = mean of the top-K map pixels; K for 256x256, scaled by area
    input_range='01',        # 01 (official code) | pm1: range of the images the U-Net sees
    # reconstruction sub-network: ADM U-Net predicting the noise
    ch=128,                  # U-Net base channels
    ch_mult=(1, 1, 2, 2, 4, 4),  # U-Net channel multiplier per resolution level
    num_res_blocks=2,        # U-Net residual blocks per level
    attn_res=(32, 16, 8),    # resolutions (px) with self-attention
    num_heads=4,             # attention heads
    # segmentation sub-network: DRAEM discriminative U-Net
    seg_ch=64,               # base width (doubles per level, capped at 8x)
    seg_levels=6,            # encoder levels (5 poolings: 8x8 bottleneck at 256 px)
    seg_prior=0.0,           # init the output bias at logit(seg_prior) (RetinaNet); 0 = default (official)
    # training
    steps=0,                 # training steps; 0 = epochs * (train images // batch_size)
    epochs=3000,             # used when steps=0 (paper: 3000 epochs, per category)
    lr=1e-4,                 # Adam, U-Net
    lr_seg=1e-5,             # Adam, segmentation net (official code; the paper says 1e-4)
    seg_cosine=10,           # seg LR: cosine to 0 over T_max steps and back up (official: 10); 0 = constant
    anneal=False,            # instead, anneal both LRs to 0 over the run with one cosine (tiny preset)
    focal_weight=5.0,        # weight of the focal term in Eq. 10 (the paper's gamma)
    anomaly_p=0.5,           # probability that a training image gets a synthetic anomaly
    anomaly_beta=(0.2, 0.8), # opacity range of Eq. 12
    foreground=False,        # restrict synthetic anomalies to an estimated object foreground
)
del config['backbone_weights']   # a shared key this method has no use for (no pretrained backbone)

# keys that older checkpoints and results.json hold under other names (old: new; common.current_names)
RENAMED = dict(heads='num_heads', p_anomaly='anomaly_p', beta='anomaly_beta', unet_ch='ch', unet_mults='ch_mult',
               unet_res='num_res_blocks')
PRESETS = {
    # 4 loader processes: the anomaly synthesis of a 256 px batch of 16 takes 0.23-0.41 s on one
    # core (textures / objects, whose foreground is estimated too), which a GPU would wait for
    'paper': dict(category='each', foreground=True, num_workers=4),
    'tiny': dict(image_size=48, input_range='pm1', ch=8, ch_mult=(1, 2, 2, 4), num_res_blocks=1,
                 attn_res=(12, 6), seg_ch=32, seg_levels=4, seg_prior=0.01, batch_size=8, steps=1900,
                 lr=2e-3, lr_seg=3e-3, anneal=True, log_interval=100, ckpt_interval=200),
}

# -----------------------------------------------------------------------------
# schedule and one-step denoising (Eqs. 1, 6, 7, 8)


def linear_abar(T, beta_1, beta_T):
    """abar_t = prod_{i<=t} (1 - beta_i) for t = 0..T-1 (0-indexed as the official code), computed in
    float64 and stored as float32."""
    betas = np.linspace(beta_1 * 1000 / T, beta_T * 1000 / T, T, dtype=np.float64)
    return torch.tensor(np.cumprod(1 - betas), dtype=torch.float32)


def gather(abar, t):
    return abar[t].view(-1, 1, 1, 1)   # (B,) -> (B,1,1,1) for broadcasting over images


def q_sample(abar, x0, t, eps):
    """Eq. 1: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
    a = gather(abar, t)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def x0_from_eps(abar, x_t, t, eps):
    """Eq. 6: the one-step estimate x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    a = gather(abar, t)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def norm_guided(unet, abar, x0, t_s, t_b, eps_s, eps_b, w):
    """Norm-guided one-step denoising (Sec. 4.2). Returns x0_g of Eq. 8 before clamping and the
    two noise predictions (float32). Both noise levels go through ONE batched U-Net call."""
    x_ts, x_tb = q_sample(abar, x0, t_s, eps_s), q_sample(abar, x0, t_b, eps_b)   # Eq. 1, twice
    e_s, e_b = unet(torch.cat([x_ts, x_tb]), torch.cat([t_s, t_b])).float().chunk(2)
    n = x0_from_eps(abar, x_tb, t_b, e_b).clamp(-1, 1)        # big-noise one-step estimate: the guide
    a = gather(abar, t_s)
    n_ts = a.sqrt() * n + (1 - a).sqrt() * e_s               # n noised with the PREDICTED noise
    e_g = e_s - (1 - a).sqrt() * w * (n_ts - x_ts)           # Eq. 7 (sim = -(n_ts - x_ts)^2 / 2)
    return x0_from_eps(abar, x_ts, t_s, e_g), e_s, e_b        # Eq. 8

# -----------------------------------------------------------------------------
# reconstruction sub-network: an ADM-style U-Net eps_theta(x_t, t)


def norm(c):
    return nn.GroupNorm(min(32, c // 4), c)   # 32 groups as ADM from 128 channels up


def zero(module):
    """Zero-initialise a layer (ADM: the last conv of each residual branch and the output)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding [sin, cos] of the raw integer timestep, as the official code (ADM orders it
    [cos, sin]; the Linear layer after it absorbs the order)."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], 1)


class ResBlock(nn.Module):
    """GN-SiLU-conv, + Linear(SiLU(temb)), GN-SiLU-zero-init conv, plus a (1x1) skip. 'down'/'up'
    resample both branches inside the block (BigGAN style: avg-pool / nearest x2)."""

    def __init__(self, cin, cout, temb, resample=None):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(temb, cout)
        self.norm2, self.conv2 = norm(cout), zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)
        self.resample = resample

    def forward(self, x, temb):
        h = F.silu(self.norm1(x))
        if self.resample == 'down':
            h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        elif self.resample == 'up':
            h, x = F.interpolate(h, scale_factor=2.0), F.interpolate(x, scale_factor=2.0)
        h = self.conv1(h) + self.emb(F.silu(temb))[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class Attention(nn.Module):
    """Self-attention over the H*W positions: GN, 1x1 qkv, multi-head attention, zero-init 1x1
    projection, residual."""

    def __init__(self, c, heads):
        super().__init__()
        self.norm, self.heads = norm(c), heads
        self.qkv, self.proj = nn.Conv1d(c, 3 * c, 1), zero(nn.Conv1d(c, c, 1))

    def forward(self, x, temb=None):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x).flatten(2)).view(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)            # each (B, heads, HW, C/heads)
        if x.is_cuda:   # fused CUDA kernels need contiguous heads (else: HW x HW scores); CPU as published
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        h = F.scaled_dot_product_attention(q, k, v)          # softmax(q k^T / sqrt(d)) v
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H * W)).view(B, C, H, W)


class UNet(nn.Module):
    """ADM U-Net: per level n_res ResBlocks (+ attention at attn_res), a down-ResBlock between
    levels; middle ResBlock-Attention-ResBlock; the up path mirrors it with n_res + 1 ResBlocks per
    level, each concatenating one skip. The output (zero-initialised) is the predicted noise."""

    def __init__(self, size, ch, mults, n_res, attn_res, heads):
        super().__init__()
        temb = 4 * ch
        self.ch = ch
        self.time = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.inp = nn.Conv2d(3, ch, 3, padding=1)

        def unit(cin, cout, res):   # a ResBlock, followed by attention at the attention resolutions
            return nn.ModuleList([ResBlock(cin, cout, temb)] + ([Attention(cout, heads)] if res in attn_res else []))
        self.down, skips, c, res = nn.ModuleList(), [ch], ch, size
        for i, m in enumerate(mults):
            for _ in range(n_res):
                self.down.append(unit(c, m * ch, res))
                c = m * ch
                skips.append(c)
            if i < len(mults) - 1:
                self.down.append(nn.ModuleList([ResBlock(c, c, temb, 'down')]))
                res //= 2
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, temb), Attention(c, heads), ResBlock(c, c, temb)])
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(mults))):
            for j in range(n_res + 1):
                self.up.append(unit(c + skips.pop(), m * ch, res))
                c = m * ch
                if i and j == n_res:                          # up-sample at the end of the level
                    self.up[-1].append(ResBlock(c, c, temb, 'up'))
                    res *= 2
        self.out = nn.Sequential(norm(c), nn.SiLU(), zero(nn.Conv2d(c, 3, 3, padding=1)))

    def forward(self, x, t):
        temb = self.time(timestep_embedding(t, self.ch))

        def run(layers, h):
            for layer in layers:
                h = layer(h, temb)
            return h
        hs = [self.inp(x)]
        for layers in self.down:
            hs.append(run(layers, hs[-1]))
        h = run(self.mid, hs[-1])
        for layers in self.up:
            h = run(layers, torch.cat([h, hs.pop()], 1))
        return self.out(h)

# -----------------------------------------------------------------------------
# segmentation sub-network: DRAEM's discriminative U-Net on cat(x, x0_g)


def conv_bn_relu(cin, cout):
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SegNet(nn.Module):
    """Encoder: `levels` blocks of [conv-BN-ReLU]x2 (widths ch, 2ch, .. capped at 8ch) separated by
    max-pooling. Decoder, per level: bilinear x2 + conv-BN-ReLU, concatenate the encoder skip,
    [conv-BN-ReLU]x2. Returns mask logits (B,H,W); the map is their sigmoid."""

    def __init__(self, ch, levels, prior=0.0, cin=6):
        super().__init__()
        w = [ch * min(2 ** i, 8) for i in range(levels)]          # encoder widths: 64 .. 512
        d = [w[max(i - 1, 0)] for i in range(levels - 1)]          # decoder widths: 64, 64, 128, ..
        self.enc = nn.ModuleList(nn.Sequential(*conv_bn_relu(w[i - 1] if i else cin, w[i]),
                                               *conv_bn_relu(w[i], w[i])) for i in range(levels))
        self.up = nn.ModuleList(nn.Sequential(
            nn.Upsample(scale_factor=2, mode='bilinear', align_corners=True),
            *conv_bn_relu(d[i + 1] if i + 2 < levels else w[-1], d[i])) for i in range(levels - 1))
        self.dec = nn.ModuleList(nn.Sequential(*conv_bn_relu(d[i] + w[i], d[i]), *conv_bn_relu(d[i], d[i]))
                                 for i in range(levels - 1))
        self.out = nn.Conv2d(d[0], 1, 3, padding=1)
        if prior:   # start from "almost nothing is anomalous" instead of p = 0.5 everywhere
            nn.init.constant_(self.out.bias, math.log(prior / (1 - prior)))

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.enc):
            x = block(F.max_pool2d(x, 2) if i else x)
            skips.append(x)
        h = skips.pop()
        for i in reversed(range(len(self.dec))):
            h = self.dec[i](torch.cat([self.up[i](h), skips.pop()], 1))
        return self.out(h)[:, 0]

# -----------------------------------------------------------------------------
# the model: both sub-networks, the schedule, and inference


class Model(nn.Module):
    INFER_KEYS = ('t_s', 't_b', 'w', 'top_k')
    SCORE_RULE = 'mean of the top-K segmentation map pixels, K = top_k * map area / 256^2 (at least 1)'

    def __init__(self, cfg):
        super().__init__()
        if not (0 <= cfg['t_s'] < cfg['T'] and 0 <= cfg['t_b'] < cfg['T']):
            raise common.UserError(f"--t_s and --t_b must lie in 0..{cfg['T'] - 1} "
                                   f"(got {cfg['t_s']} and {cfg['t_b']})")
        if cfg['input_range'] not in ('01', 'pm1'):
            raise common.UserError(f"--input_range must be 01 or pm1 (got {cfg['input_range']!r})")
        f = 2 ** max(len(cfg['ch_mult']) - 1, cfg['seg_levels'] - 1)    # the deepest downsampling
        if cfg['image_size'] % f:
            raise common.UserError(f"--image_size {cfg['image_size']} must be divisible by {f} (the U-Net's "
                                   'and the segmentation net\'s halvings)')
        if len(cfg['betas']) != 2 or len(cfg['anomaly_beta']) != 2:
            raise common.UserError(f"--betas and --anomaly_beta take two values, e.g. --anomaly_beta 0.2,0.8 (got "
                                   f"{cfg['betas']} and {cfg['anomaly_beta']})")
        (b_1, b_T), levels = cfg['betas'], [cfg['image_size'] >> i for i in range(len(cfg['ch_mult']))]
        widths = [cfg['ch'] * m for m, r in zip(cfg['ch_mult'], levels) if r in cfg['attn_res']]   # with attention,
        widths.append(cfg['ch'] * cfg['ch_mult'][-1])                                          # the middle's too
        for bad, fix in ((not 0 <= b_1 <= b_T < cfg['T'] / 1000, '--betas need 0 <= first <= last < T / 1000 (they '
                          f"are scaled by 1000 / T; got {cfg['betas']})"),
                         (not 0 < cfg['tau'] < cfg['T'], f"--tau must lie in 1..{cfg['T'] - 1} (got {cfg['tau']})"),
                         (cfg['attn_res'] and not set(cfg['attn_res']) & set(levels),     # a typo: no attention
                          f"--attn_res {cfg['attn_res']} matches none of the U-Net's resolutions {tuple(levels)}; "
                          '--attn_res= builds no attention'),
                         (cfg['num_heads'] < 1 or any(w % cfg['num_heads'] for w in widths),
                          f"--num_heads {cfg['num_heads']} must divide each attention width {tuple(widths)}"),
                         (cfg['seg_ch'] < 1 or cfg['seg_levels'] < 2 or not 0 <= cfg['seg_prior'] < 1,
                          'need --seg_ch >= 1, --seg_levels >= 2 and 0 <= --seg_prior < 1')):
            if bad:
                raise common.UserError(fix)
        self.cfg = cfg
        try:
            self.unet = UNet(cfg['image_size'], cfg['ch'], cfg['ch_mult'], cfg['num_res_blocks'],
                             cfg['attn_res'], cfg['num_heads'])
        except (ValueError, ZeroDivisionError) as e:     # GroupNorm of a width its group count does not divide
            raise common.UserError(f"--ch {cfg['ch']} --ch_mult {cfg['ch_mult']}: {e} (GroupNorm: every width it "
                                   'normalises, skips concatenated included, must be a multiple of 4, and of 32 from '
                                   '128 up; multiples of 32 always work)')
        self.seg = SegNet(cfg['seg_ch'], cfg['seg_levels'], cfg['seg_prior'])
        self.register_buffer('abar', linear_abar(cfg['T'], *cfg['betas']))   # abar_t, float32

    def to_model(self, x):
        """Images in [0,1] -> the U-Net's input range."""
        return x if self.cfg['input_range'] == '01' else 2 * x - 1

    def forward(self, x, t_s, t_b, eps_s, eps_b):
        """x (model range) -> (mask logits (B,H,W), clamped x0_g, eps_hat_s, eps_hat_b)."""
        x0_g, e_s, e_b = norm_guided(self.unet, self.abar, x, t_s, t_b, eps_s, eps_b, self.cfg['w'])
        x0_g = x0_g.clamp(-1, 1)                     # official clamp (also in the [0,1] range)
        return self.seg(torch.cat([x, x0_g], 1)), x0_g, e_s, e_b

    @torch.no_grad()
    def predict(self, batch):
        """One norm-guided step at fixed (t_s, t_b), then the segmentation map and the top-K score."""
        x, cfg = self.to_model(batch['image']), self.cfg
        B, _, H, W = x.shape
        t_s = torch.full((B,), cfg['t_s'], dtype=torch.long, device=x.device)
        t_b = torch.full((B,), cfg['t_b'], dtype=torch.long, device=x.device)
        eps = common.sample_noise((2, 3, H, W), cfg['seed'], batch['path'], x.device)  # (B,2,3,H,W)
        with common.autocast(x.device, cfg['dtype']):
            logits, x0_g, _, _ = self(x, t_s, t_b, eps[:, 0], eps[:, 1])
        amap = torch.sigmoid(logits.float())
        k = min(H * W, max(1, round(cfg['top_k'] * H * W / 256 ** 2)))
        recon = x0_g if cfg['input_range'] == '01' else (x0_g + 1) / 2
        return dict(map=amap, score=amap.flatten(1).topk(k, 1).values.mean(1),
                    recon=recon.float().clamp(0, 1), nfe={'unet': 2, 'seg': 1})

# -----------------------------------------------------------------------------
# losses (Eqs. 9, 10) and training data


def noise_loss(e_s, e_b, eps_s, eps_b, label):
    """Eq. 9 on normal samples only, without the 1/2 (official code): the mean over the normal
    samples of the global batch of ||eps_s - eps_hat_s||^2 + ||eps_b - eps_hat_b||^2 (each a
    per-pixel mean); 0 if none. Under DDP the normal count is summed over ranks and the loss scaled
    by world, which the gradient average over ranks cancels: every normal sample weighs the same."""
    per_sample = ((e_s - eps_s) ** 2).mean((1, 2, 3)) + ((e_b - eps_b) ** 2).mean((1, 2, 3))
    normal = (label == 0).float()
    n, world = normal.sum(), common.rank_world()[1]
    if world > 1:
        torch.distributed.all_reduce(n)
    return (per_sample * normal).sum() * world / n.clamp(min=1)


def focal_loss(logits, mask, gamma=4.0, alpha=0.5):
    """Binary focal loss, mean of alpha (1 - p_t)^gamma (-log p_t), p_t = the probability of the
    true class (official BinaryFocalLoss: gamma 4, constant alpha 0.5)."""
    bce = F.binary_cross_entropy_with_logits(logits, mask, reduction='none')   # -log p_t
    return (alpha * (1 - torch.exp(-bce)) ** gamma * bce).mean()


def mask_loss(logits, mask, focal_weight):
    """Eq. 10: SmoothL1(M, M_hat) + gamma * focal(M, M_hat), M_hat = sigmoid(logits)."""
    return F.smooth_l1_loss(torch.sigmoid(logits), mask) + focal_weight * focal_loss(logits, mask)


TEXTURES = ('carpet', 'grid', 'leather', 'tile', 'wood', 'zipper', 'weave', 'grain',   # official list (MVTec,
            *(f'Class{i}' for i in range(1, 11)))                                    # DAGM) + synthetic


def foreground(image, thresh=0.15):
    """A rough object mask (H,W) for restricting synthetic anomalies: pixels whose colour differs
    from the median colour of the image border by more than thresh, closed and hole-filled; None
    (no restriction) when it finds nothing. image: (3,H,W) in [0,1]."""
    x = image.numpy()
    border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], 1)   # (3, 4 sides)
    dist = np.abs(x - np.median(border, 1)[:, None, None]).max(0)
    fg = ndimage.binary_fill_holes(ndimage.binary_closing(dist > thresh, iterations=2))
    return fg.astype(np.float32) if fg.any() else None


def synth_anomaly(sample, rng, cfg, categories):
    """A training sample: with probability anomaly_p a Perlin anomaly (Eq. 12), mask and label.
    As the official code, textures (by category name) take DTD textures anywhere in the image,
    objects a DTD texture or, half the time, a strip-shuffled copy of themselves, restricted to
    the object with --foreground."""
    texture = categories[sample['cls']] in TEXTURES
    fg = foreground(sample['image']) if cfg['foreground'] and not texture else None
    return common.perlin_anomaly(sample, rng, cfg['anomaly_p'], cfg['anomaly_beta'], cfg['dtd_root'], fg,
                                 dtd_self=0.0 if texture else 0.5)


def learning_rates(cfg, step, steps):
    """(U-Net LR, segmentation LR) at a step. Official: constant lr for the U-Net; lr_seg with
    CosineAnnealingLR(T_max=seg_cosine, eta_min=0) stepped every iteration, whose closed form is used
    here: past T_max it rises again, so with T_max=10 the LR oscillates between lr_seg and 0 (period
    20). With anneal, both LRs follow one cosine from their base value to 0 over the whole run."""
    def cosine(period):
        return (1 + math.cos(math.pi * step / period)) / 2 if period else 1.0
    if cfg['anneal']:
        return cfg['lr'] * cosine(steps), cfg['lr_seg'] * cosine(steps)
    return cfg['lr'], cfg['lr_seg'] * cosine(cfg['seg_cosine'])

# -----------------------------------------------------------------------------
# training


def train_step(net, model, opts, batch, cfg, step):
    """One joint step (Eq. 11): noise loss + mask loss, gradients into both networks."""
    rank, _ = common.rank_world()
    dev = cfg['device']
    x, mask, label = model.to_model(batch['image'].to(dev)), batch['mask'][:, 0].to(dev), batch['label'].to(dev)
    B = x.shape[0]
    g = common.generator(cfg['seed'], rank, step, device=dev)   # all randomness of this step
    t_s = torch.randint(0, cfg['tau'], (B,), generator=g, device=g.device).to(dev)
    t_b = torch.randint(cfg['tau'], cfg['T'], (B,), generator=g, device=g.device).to(dev)
    eps_s, eps_b = torch.randn((2,) + x.shape, generator=g, device=g.device).to(dev).unbind(0)
    with common.autocast(dev, cfg['dtype']):
        logits, _, e_s, e_b = net(x, t_s, t_b, eps_s, eps_b)
    l_noise = noise_loss(e_s, e_b, eps_s, eps_b, label)
    l_mask = mask_loss(logits.float(), mask, cfg['focal_weight'])
    loss = l_noise + l_mask                                         # Eq. 11
    common.check_finite(loss, step, os.path.join(cfg['out_dir'], 'ckpt.pt'))
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    loss.backward()                                                 # no detach: seg loss trains the U-Net too
    common.all_reduce_grads(model.parameters())
    for opt in opts:
        opt.step()
    return loss.item(), l_noise.item(), l_mask.item()


def average_bn_statistics(net):
    """Without SyncBatchNorm (CPU) every rank's BatchNorm tracks its own share of the batch: average
    the running statistics over ranks so that all ranks hold the same model. Training reads only
    batch statistics and the running update is linear, so this is done once per checkpoint."""
    _, world = common.rank_world()
    if world > 1:
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):        # SyncBatchNorm (CUDA) is not a BatchNorm2d
                for b in (m.running_mean, m.running_var):
                    torch.distributed.all_reduce(b)
                    b /= world


def setup(cfg):
    """Build the model and optimisers, or restore them from out_dir/ckpt.pt (--resume; the run then
    keeps the checkpoint's config, see common.resume). Returns (model, opts, step, seconds)."""
    _, world = common.rank_world()
    common.seed_everything(cfg['seed'])        # same initial weights on every rank
    model, ckpt = common.resume(cfg, Model) if cfg['resume'] else (Model(cfg).to(cfg['device']), None)
    if world > 1 and 'cuda' in cfg['device']:   # BatchNorm statistics over the global batch
        model.seg = nn.SyncBatchNorm.convert_sync_batchnorm(model.seg)
    common.print0('parameters: ' + ', '.join(f'{n} {sum(p.numel() for p in m.parameters()) / 1e6:.1f} M'
                                             for n, m in model.named_children()))
    opts = (torch.optim.Adam(model.unet.parameters(), lr=model.cfg['lr']),
            torch.optim.Adam(model.seg.parameters(), lr=model.cfg['lr_seg']))
    if ckpt is None:
        return model, opts, 0, 0.0
    for opt, state in zip(opts, (ckpt['opt_unet'], ckpt['opt_seg'])):
        common.load_optimizer(opt, state)
    return model, opts, ckpt['step'], ckpt['train_seconds']


def train(cfg):
    """Joint training of both sub-networks for `steps` steps; returns (model in eval mode, seconds)."""
    model, opts, step, seconds = setup(cfg)
    cfg = model.cfg                            # the checkpoint's, when resuming
    data = common.load_dataset(cfg, 'train')
    if cfg['preset'] == 'paper' and not cfg['dtd_root']:
        common.print0("note: no --dtd_root, so the anomalies take procedural textures; the paper's come from DTD "
                      '(https://www.robots.ox.ac.uk/~vgg/data/dtd/, then --dtd_root DIR)')
    steps = cfg['steps'] or cfg['epochs'] * max(1, len(data) // cfg['batch_size'])   # drop_last, as official
    if steps < 1:
        raise common.UserError(f"--steps {cfg['steps']} and --epochs {cfg['epochs']}: nothing to train")
    batches = common.train_batches(data, cfg, step,
                                   functools.partial(synth_anomaly, cfg=cfg, categories=data.categories))
    net = torch.compile(model) if cfg['compile'] else model   # shares the weights of model
    ckpt_path, (rank, world) = os.path.join(cfg['out_dir'], 'ckpt.pt'), common.rank_world()
    if cfg['batch_size'] // world < 2 and cfg['image_size'] >> (cfg['seg_levels'] - 1) < 2:
        raise common.UserError("the segmentation net's BatchNorm needs more than one value per channel: with its "
                               '1x1 bottleneck (image_size / 2^(seg_levels - 1)) train on >= 2 images per rank')
    model.train()
    t0, t_log, avg = time.time(), time.time(), np.zeros(4)   # sums of (loss, noise, mask, steps)
    for step in tqdm(range(step, steps), initial=step, total=steps, disable=rank != 0, leave=False):
        for opt, lr in zip(opts, learning_rates(cfg, step, steps)):
            for group in opt.param_groups:
                group['lr'] = lr
        avg += (*train_step(net, model, opts, next(batches), cfg, step), 1)
        done = step + 1
        if done % cfg['log_interval'] == 0 or done == steps:
            if world > 1:                      # the mean over every rank's samples (rank 0's own noise
                sums = torch.tensor(avg, device=cfg['device'])   # loss is its share times world)
                torch.distributed.all_reduce(sums)
                avg = sums.cpu().numpy() / world
            loss, l_noise, l_mask, n = *(avg[:3] / avg[3]), avg[3]
            if rank == 0:
                lr, lr_seg = learning_rates(cfg, step, steps)
                tqdm.write(f'step {done}/{steps} | loss {loss:.4f} (noise {l_noise:.4f}, mask {l_mask:.4f}) | '
                           f'lr {lr:.1e} seg {lr_seg:.1e} | {n / (time.time() - t_log):.2f} it/s')
            t_log, avg = time.time(), np.zeros(4)
        if done % cfg['ckpt_interval'] == 0 or done == steps:
            average_bn_statistics(model.seg)
            common.save(ckpt_path, model, opt_unet=opts[0].state_dict(), opt_seg=opts[1].state_dict(),
                        step=done, final=done == steps, train_seconds=seconds + time.time() - t0)
    return model.eval(), seconds + time.time() - t0


def main(argv=None):
    common.run(common.get_config(config, PRESETS, argv, __file__, __doc__), train, Model)


if __name__ == '__main__':
    common.cli(main)
