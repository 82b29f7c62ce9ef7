"""
lasb.py: LASB, a latent Schroedinger bridge from anomalous to normal latents (minimal re-implementation).

S. Akshay Patel, N. Lakshmi Narasimhan, J. George, V. N. Balasubramanian: "A Unified Latent Schrodinger
Bridge Diffusion Model for Unsupervised Anomaly Detection and Localization", CVPR 2025.

The idea. A diffusion model that starts from Gaussian noise must re-invent the image and blurs fine
structure. LASB learns a Schroedinger bridge between two *data* distributions instead: latents of
anomalous images (z1) and latents of the same images without the anomaly (z0). Trained on pairs made
from normal images and synthetic anomalies, the bridge learns to remove anomalies and to leave normal
content alone. At test time it carries the latent of the test image to the normal side; the decoded
"normal twin" is compared with the test image in a pretrained feature space, and the difference is the
anomaly map. One model serves every category (unified setting); no segmentation network is needed.

  stage 1  VQ autoencoder, shaped as LDM's vq-f4 (Table S7: 256x256x3 -> 64x64x3, 128 channels,
           multipliers 1,2,4, 2 res blocks), trained on the normal training images, then frozen.
  stage 2  I2SB (Liu et al., ICML 2023) in that latent space, with I2SB's equation numbers:
           betas = linspace(sqrt(beta_min/T), sqrt(beta_max/T), T)^2, first half then mirrored
           std_fwd^2 = sum_{s<=t} beta_s,  std_bwd^2 = sum_{s>=t} beta_s
           z_t = mu0 z0 + mu1 z1 + std_sb eps,  (mu0, mu1, std_sb^2) = (std_bwd^2, std_fwd^2,
                 std_fwd^2 std_bwd^2) / (std_fwd^2 + std_bwd^2)                        Eq. 11
           loss = || net(z_t, t) - (z_t - z0) / std_fwd[t] ||^2                         Eq. 12
           sampling: nfe DDPM posterior steps p(z_prev | z_n, z0^) from z1 = E(x) to step 0  Eq. 4
  map      DiAD's protocol: 1 - cosine similarity of ResNet stages 1-3 between x and D(z at step 0), upsampled,
           summed, Gaussian blur; image score = max after repeated stride-1 average pooling.

Sources. LASB's code was never released and only the supplement is public. The method is rebuilt
from its hyperparameter table (S7), a summary of the main paper, and the public code its numbers
match exactly (LDM vq-f4, NVlabs I2SB, DiAD's evaluation); the README's LASB section has more.
Inferences [I] and guesses [G] are config keys:
  - training pairs [G]: z1 = E(x~), x~ = DRAEM-style Perlin anomaly of x (common.perlin_anomaly) with
    probability anomaly_p = 0.5 (else the identity pair z1 = z0, which teaches "leave normal alone");
    texture blend b ~ U(anomaly_beta) = U(0, 0.8) as DRAEM (DiffusionAD uses U(0.2, 0.8)).
  - latents [I]: the bridge runs on the pre-quantisation encoder output and D quantises on decode, as
    LDM's VQModelInterface (latent='quant' bridges codebook vectors instead).
  - latent scale [G]: I2SB's noise (std_sb <= 0.19) only means something relative to the
    latent scale. LDM uses 1.0 for VQ models; we use 1/std of the training latents (latent_scale=0),
    so both presets see unit-scale latents; --latent_scale 1.0 gives LDM's convention.
  - bridge UNet [I]: ADM as I2SB configures it (scale-shift norm, resblock_updown, dropout 0, no z1
    concatenation since Table S7's input is 64x64x3). Table S7 says 224 channels, the S4 text 320:
    with multipliers (1,4,8) that is 0.81 B or 1.65 B parameters (printed at start; the autoencoder
    has LDM vq-f4's 55.3 M). attn_res (32,16,8) is I2SB's ADM string; on a 64-px latent with 3
    levels, 8 is never reached. num_heads 8 as Table S7 (I2SB's ADM uses 64 channels per head).
  - EMA 0.99 with torch_ema's warm-up min(0.99, (1+n)/(10+n)), AdamW (weight decay 0), StepLR 0.99
    per 1000 steps: I2SB defaults (Table S7's lr 5e-5 is I2SB's too).
  - anomaly map [I]: DiAD (timm resnet50 stages 1-3, 1 - cos, bilinear align_corners, sum, sigma 5 at
    256 px, 8x avg_pool2d(8, stride 1) then max). n_samples > 1 averages the maps of independent
    bridge samples (the supplement's 2x/4x/8x rows).
Deviations (offline, from scratch):
  - the paper fine-tunes a pretrained vq-f4 (lr 4.5e-6, L1 + LPIPS); no such weights exist offline, so
    stage 1 trains from scratch (ae_lr 1e-4) with L1 + ssim_weight * (1 - SSIM) + commitment and an EMA
    codebook with dead-code restarts (LDM learns the codebook by loss, which from scratch is prone to
    collapse). Codebook usage is logged at the end of stage 1 and kept in the checkpoint (ae.vq.usage).
  - the paper preset loads the backbone's ImageNet weights from the timm cache (an error if absent);
    with --backbone_weights '' (the tiny preset's) it is random-initialised with BatchNorm statistics
    re-estimated on the normal training images (saved in the checkpoint). timm zero-initialises the
    last BatchNorm scale of every ResNet block (zero_init_last), and recalibration leaves scales
    alone, so each residual branch outputs 0: the random ResNet is its stem plus the 1x1 shortcut
    projections, an 11 px receptive field at every stage (stage 3, in the paper preset's map,
    depends on ~45% of the pixels). Kept: with the branches switched on (zero_init_last=False)
    the tiny runs scored lower, measured after the fact (AMD EPYC, seed 0: 73.9 / 86.4 image / pixel
    AUROC against 83.6 / 90.6). The tiny preset adds pixel_weight * |x - x^| (channel mean) to the map.
    With --backbone_weights timm (or a file) the map is DiAD's, pretrained ImageNet weights recorded
    by id and sha256.
  - the tiny preset (64 px, 16x16x3 latents, small networks, 700 + 1100 steps, 10 NFE) is a CPU-minutes
    scale; its map uses backbone stages 1-2 (stage 3 is 4x4 at 64 px), DiAD's pool 8 x 64/256 = 2 and
    sigma 1.5 (5 x 64/256 = 1.25, rounded up).

  python lasb.py                                                   # tiny: synthetic, both stages, eval
  python lasb.py --data mvtec --category each --dtd_root data/dtd       # class-based, paper preset
  torchrun --standalone --nproc_per_node=8 lasb.py --data visa --dtd_root data/dtd --ae_batch_size 8   # unified
  python eval.py out/lasb_synthetic_all_tiny_s0/ckpt.pt --nfe 20 --n_samples 4
"""
import functools
import math
import os
import time

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common

# -----------------------------------------------------------------------------
# config: the defaults are the paper preset (Table S7 + I2SB/LDM/DiAD defaults), tiny fits a CPU

config = dict(
    common.BASE_CONFIG,
    # stage 1: VQ autoencoder (Table S7, right column; LDM vq-f4)
    ae_ch=128,                 # autoencoder base channels (Table S7)
    ae_mult=(1, 2, 4),         # channel multipliers; a stride-2 step between levels: f4 (Table S7)
    ae_res_blocks=2,           # residual blocks per level (Table S7)
    embed_dim=3,               # latent channels = codebook vector size (Table S7)
    n_embed=8192,              # codebook size (LDM vq-f4)
    vq_beta=0.25,              # commitment weight (VQ-VAE Eq. 3; LDM)
    vq_decay=0.99,             # EMA decay of the codebook (VQ-VAE App. A.1) [deviation]
    vq_restart=100,            # steps a code may stay unused before it restarts on an encoder output
    ssim_weight=0.5,           # AE loss = L1 + ssim_weight * (1 - SSIM) + commitment [deviation: LPIPS]
    ae_steps=50000,            # autoencoder iterations (Table S7)
    ae_batch_size=4,           # autoencoder batch size (Table S7)
    ae_lr=1e-4,                # Adam(0.5, 0.9) lr; the paper fine-tunes at 4.5e-6, we train from scratch
    latent='prequant',         # bridge 'prequant' encoder outputs (LDM interface) or 'quant' codes [I]
    latent_scale=0.0,          # z = latent_scale * E(x); 0 = 1/std of the training latents [G]
    # stage 2: the I2SB bridge (Table S7, left column)
    T=1000,                    # diffusion steps (Table S7)
    beta_min=0.1,              # beta range [0.1, 0.3] (Table S7) = I2SB's linear_start * T ...
    beta_max=0.3,              # ... and I2SB's beta_max
    ch=224,                    # bridge UNet base channels (Table S7; the S4 text says 320)
    ch_mult=(1, 4, 8),         # UNet channel multipliers (Table S7)
    num_res_blocks=2,          # UNet residual blocks per level (Table S7)
    attn_res=(32, 16, 8),      # latent resolutions with self-attention (Table S7, ADM string)
    num_heads=8,               # attention heads (Table S7)
    steps=500000,              # bridge iterations (Table S7)
    lr=5e-5,                   # AdamW lr, weight decay 0 (Table S7, I2SB)
    lr_gamma=0.99,             # lr *= lr_gamma every 1000 steps (I2SB StepLR)
    ema_decay=0.99,            # EMA decay of the bridge weights used for sampling (I2SB)
    anomaly_p=0.5,             # share of pairs with a Perlin anomaly, the rest are (x, x) [G]
    anomaly_beta=(0.0, 0.8),   # range of the image's weight in the anomaly blend (DRAEM) [G]
    # inference (INFER_KEYS: eval.py may change them without retraining)
    nfe=100,                   # bridge network evaluations = DDPM posterior steps (Table S7)
    n_samples=1,               # bridge samples whose maps are averaged (S1/S2: 2x, 4x, 8x)
    backbone='resnet50',       # timm backbone of the anomaly map (DiAD) [I]
    layers=(1, 2, 3),          # its feature stages compared by 1 - cosine (DiAD) [I]
    pixel_weight=0.0,          # weight of the channel-mean |x - x^| term in the map [deviation]
    sigma=5.0,                 # Gaussian blur of the map, pixels at image_size (DiAD: 5 at 256) [I]
    score_pool=(8, 8),         # score = max after score_pool[1] x avg_pool2d(score_pool[0], stride 1)
)
config.update(batch_size=8, image_size=256, log_interval=500, ckpt_interval=5000)

# keys that older checkpoints and results.json hold under other names (old: new; common.current_names)
RENAMED = dict(ema='ema_decay')
STAGE1_KEYS = tuple('ae_steps ae_batch_size ae_lr ssim_weight vq_beta vq_decay vq_restart latent latent_scale'.split())
PRESETS = {
    # the defaults above, with DiAD's ImageNet ResNet; 4 loader processes, as the Perlin synthesis
    # of a 256 px batch of 8 takes 0.13-0.16 s on one core, which a GPU would wait for
    'paper': dict(backbone_weights='timm', num_workers=4),
    'tiny': dict(  # CPU minutes on the synthetic benchmark: 64 px images, 16x16x3 latents
        image_size=64, batch_size=16, log_interval=100, ckpt_interval=300,
        # a small autoencoder; batch 8 x 700 steps beat 16 x 350 at equal CPU (val L1 0.026 vs 0.035)
        ae_ch=16, ae_res_blocks=1, n_embed=512, vq_restart=20, ae_steps=700, ae_batch_size=8, ae_lr=1e-3,
        # a small bridge UNet (16 -> 8 -> 4 latent pixels), larger lr for the short schedule
        ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_res=(8,), num_heads=4, steps=1100, lr=5e-4,
        # the paper's map scaled to 64 px (x 64/256): pool 8 -> 2, sigma 5 -> 1.5 (1.25, rounded up);
        # stage 3 would be a 4x4 map (16x16 at 256 px), too coarse to localise, so stages 1-2; 10 NFE
        # (the paper's fast point)
        nfe=10, layers=(1, 2), pixel_weight=1.0, sigma=1.5, score_pool=(2, 8)),
}

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# -----------------------------------------------------------------------------
# building blocks shared by the autoencoder (LDM) and the bridge UNet (ADM)


def norm(c):
    """GroupNorm with 32 groups where the width allows (LDM, ADM), fewer for tiny widths; eps 1e-6 as LDM
    everywhere (ADM's U-Net uses 1e-5: a negligible difference)."""
    return nn.GroupNorm(min(32, c // 4), c, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice plus a skip (LDM's ResnetBlock). With emb_dim > 0 it is ADM's block
    as I2SB uses it: the timestep embedding scales and shifts the second norm (use_scale_shift_norm),
    the last conv starts at zero, and resample 'down'/'up' changes the resolution inside the block
    (resblock_updown: average pooling / nearest upsampling)."""

    def __init__(self, cin, cout, emb_dim=0, resample=None):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout) if emb_dim else None
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.resample = resample
        if emb_dim:   # ADM zero_module: a new residual block starts as the identity
            nn.init.zeros_(self.conv2.weight)
            nn.init.zeros_(self.conv2.bias)

    def _resample(self, x):
        if self.resample == 'down':
            return F.avg_pool2d(x, 2)
        return F.interpolate(x, scale_factor=2.0, mode='nearest') if self.resample == 'up' else x

    def forward(self, x, emb=None):
        h = self.conv1(self._resample(F.silu(self.norm1(x))))
        h = self.norm2(h)
        if self.emb is not None:
            scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, 1)
            h = h * (1 + scale) + shift
        return self.skip(self._resample(x)) + self.conv2(F.silu(h))


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, residual; the output projection
    starts at zero so a new block is the identity (ADM). heads=1 is LDM's AttnBlock, but for that zero
    start (which LDM does not have)."""

    def __init__(self, c, heads=1):
        super().__init__()
        self.norm, self.qkv, self.out, self.heads = norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1), heads
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)                  # (B, heads, HW, C/heads) each
        if x.is_cuda:   # fused CUDA kernels need contiguous heads (else: HW x HW scores); CPU as published
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(h.transpose(-1, -2).reshape(B, C, H, W))


class Blocks(nn.ModuleList):
    """Apply in order; residual blocks also get the timestep embedding (ADM's TimestepEmbedSequential)."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x

# -----------------------------------------------------------------------------
# stage 1: the VQ autoencoder (LDM VQModel with a vq-f4 configuration)


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantisation with a straight-through gradient (VQ-VAE Eq. 1-3). The codebook
    is an EMA of the encoder outputs assigned to each code (VQ-VAE App. A.1), and a code unused for
    `restart` steps jumps to a random encoder output: together they prevent codebook collapse."""

    def __init__(self, n_embed, dim, beta, decay, restart):
        super().__init__()
        self.beta, self.decay, self.restart = beta, decay, restart
        self.register_buffer('embed', torch.randn(n_embed, dim))       # e_k
        self.register_buffer('ema_count', torch.ones(n_embed))          # EMA of N_k
        self.register_buffer('ema_sum', self.embed.clone())             # EMA of sum of h assigned to k
        self.register_buffer('idle', torch.full((n_embed,), float(restart)))   # first batch seeds all
        self.register_buffer('usage', torch.zeros(n_embed))   # code counts on the training set (stage 1 end)

    def codes(self, h):
        """(B, d, H, W) -> (B, H, W) index of the nearest code (one sample at a time: 8192 codes), in
        float32 under bfloat16 autocast too: its ~3 digits pick another code for ~35% of latents. On
        CUDA the matmul runs in TF32, as every float32 matmul there (common.pick_device): then ~3% of
        latents (8192 codes) get a code whose distance is within TF32's rounding of the nearest."""
        flat = h.float().permute(0, 2, 3, 1).flatten(1, 2)             # (B, HW, d)
        with torch.autocast(h.device.type, enabled=False):
            e2 = self.embed.pow(2).sum(1)
            idx = [(f.pow(2).sum(1, keepdim=True) - 2 * f @ self.embed.t() + e2).argmin(1) for f in flat]
        return torch.stack(idx).view(h.shape[0], *h.shape[2:])

    def forward(self, h):
        """Quantise h: returns (h + sg(e - h), commitment loss beta ||h - sg(e)||^2, indices)."""
        idx = self.codes(h)
        e = self.embed[idx].permute(0, 3, 1, 2)                         # (B, d, H, W)
        commit = self.beta * F.mse_loss(h.float(), e)
        return h + (e - h).detach(), commit, idx                        # straight-through estimator

    @torch.no_grad()
    def update(self, h, idx, gen):
        """One EMA codebook step (Laplace-smoothed counts) and the dead-code restarts; statistics are
        summed over DDP ranks and restarts broadcast from rank 0, so every rank has one codebook."""
        flat, idx = h.float().permute(0, 2, 3, 1).reshape(-1, h.shape[1]), idx.flatten()
        count = torch.bincount(idx, minlength=len(self.embed)).float()
        total = torch.zeros_like(self.embed).index_add_(0, idx, flat)
        if dist.is_initialized():
            dist.all_reduce(count)
            dist.all_reduce(total)
        self.ema_count.lerp_(count, 1 - self.decay)
        self.ema_sum.lerp_(total, 1 - self.decay)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + 1e-5) / (n + len(self.embed) * 1e-5) * n   # Laplace: no zero counts
        self.embed.copy_(self.ema_sum / smoothed[:, None])
        self.idle.add_(1).masked_fill_(count > 0, 0)
        dead = self.idle >= self.restart
        if dead.any():
            rows = torch.randint(len(flat), (int(dead.sum()),), generator=gen, device=gen.device)
            pick = flat[rows.to(flat.device)]
            self.embed[dead], self.ema_sum[dead], self.ema_count[dead], self.idle[dead] = pick, pick, 1.0, 0.0
            for buf in (self.embed, self.ema_sum, self.ema_count) if dist.is_initialized() else ():
                dist.broadcast(buf, 0)


def encoder(ch, mult, nres, zdim):
    """LDM Encoder: conv, per level `nres` res blocks and a stride-2 conv (not after the last level),
    middle res-attention-res, GroupNorm-SiLU-conv to zdim channels, then quant_conv (1x1)."""
    layers, c = [nn.Conv2d(3, ch, 3, padding=1)], ch
    for i, m in enumerate(mult):
        for _ in range(nres):
            layers.append(ResBlock(c, ch * m))
            c = ch * m
        if i < len(mult) - 1:   # LDM pads right/bottom by one, then a 3x3 stride-2 conv
            layers.append(nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(c, c, 3, 2)))
    layers += [ResBlock(c, c), Attention(c), ResBlock(c, c), norm(c), nn.SiLU(),
               nn.Conv2d(c, zdim, 3, padding=1), nn.Conv2d(zdim, zdim, 1)]
    return nn.Sequential(*layers)


def decoder(ch, mult, nres, zdim):
    """LDM Decoder: post_quant_conv (1x1), conv, middle res-attention-res, per level (coarse to fine)
    nres + 1 res blocks and a nearest x2 upsampling + conv, GroupNorm-SiLU-conv to RGB."""
    c = ch * mult[-1]
    layers = [nn.Conv2d(zdim, zdim, 1), nn.Conv2d(zdim, c, 3, padding=1),
              ResBlock(c, c), Attention(c), ResBlock(c, c)]
    for i in reversed(range(len(mult))):
        for _ in range(nres + 1):
            layers.append(ResBlock(c, ch * mult[i]))
            c = ch * mult[i]
        if i > 0:
            layers += [nn.Upsample(scale_factor=2.0, mode='nearest'), nn.Conv2d(c, c, 3, padding=1)]
    layers += [norm(c), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1)]
    return nn.Sequential(*layers)


class VQAE(nn.Module):
    """encode: image in [-1,1] -> pre-quantisation latent h; decode: quantise h, then decode (LDM)."""

    def __init__(self, cfg):
        super().__init__()
        args = cfg['ae_ch'], cfg['ae_mult'], cfg['ae_res_blocks'], cfg['embed_dim']
        self.encoder, self.decoder = encoder(*args), decoder(*args)
        self.vq = VectorQuantizer(cfg['n_embed'], cfg['embed_dim'], cfg['vq_beta'], cfg['vq_decay'],
                                  cfg['vq_restart'])


def ssim(a, b, sigma=1.5, c1=0.01 ** 2, c2=0.03 ** 2):
    """Mean SSIM (Wang et al. 2004, Gaussian window sigma 1.5) of images in [0, 1]."""
    blur = functools.partial(common.gaussian_blur, sigma=sigma)
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    s = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean()

# -----------------------------------------------------------------------------
# stage 2: the I2SB bridge (schedule, marginal, label, posterior, sampler) and its ADM UNet


def bridge_schedule(T, beta_min, beta_max):
    """I2SB's symmetric schedule and closed forms, in float64 (the Model stores float32 copies)."""
    if T % 2:
        raise common.UserError(f'--T must be even (the schedule mirrors its first half), got {T}')
    betas = np.linspace(np.sqrt(beta_min / T), np.sqrt(beta_max / T), T) ** 2   # beta_min/T .. beta_max/T
    betas = np.concatenate([betas[:T // 2], np.flip(betas[:T // 2])])          # small at both ends
    var_fwd = np.cumsum(betas)                                   # std_fwd^2 = sigma_t^2
    var_bwd = np.flip(np.cumsum(np.flip(betas)))                 # std_bwd^2 = bar sigma_t^2
    denom = var_fwd + var_bwd                                    # Gaussian product (Eq. 11)
    return dict(betas=betas, std_fwd=np.sqrt(var_fwd), std_bwd=np.sqrt(var_bwd),
                mu0=var_bwd / denom, mu1=var_fwd / denom, std_sb=np.sqrt(var_fwd * var_bwd / denom),
                t_net=np.linspace(1e-4, 1.0, T) * T)             # time fed to the net (I2SB network.py)


def space_indices(T, count):
    """`count` evenly spaced rounded steps from 0 to T-1: nfe 100 -> 0, 10, 20, ..., 989, 999. I2SB
    accumulates the fractional stride instead, which can round a .5 tie the other way (one index off by
    one for some nfe, e.g. 20); at nfe 10 and 100 the two give the same steps."""
    return [int(i) for i in np.round(np.linspace(0, T - 1, count))]


class Bridge(nn.Module):
    """The schedule as float32 buffers and the bridge's closed forms (I2SB's Diffusion class). Time
    runs from step 0 (z0, normal) to step T-1 (z1, anomalous)."""

    def __init__(self, cfg):
        super().__init__()
        for name, v in bridge_schedule(cfg['T'], cfg['beta_min'], cfg['beta_max']).items():
            self.register_buffer(name, torch.from_numpy(v.copy()).float())

    def q_sample(self, n, z0, z1, eps):
        """Eq. 11: z_n = mu0[n] z0 + mu1[n] z1 + std_sb[n] eps, n (B,) steps."""
        c = lambda a: a[n].view(-1, 1, 1, 1)
        return c(self.mu0) * z0 + c(self.mu1) * z1 + c(self.std_sb) * eps

    def label(self, n, z0, zn):
        """Eq. 12: the network's target (z_n - z0) / std_fwd[n]."""
        return (zn - z0) / self.std_fwd[n].view(-1, 1, 1, 1)

    def coef(self, prev, n):
        """DDPM posterior p(z_prev | z_n, z0) = N(a z0 + b z_n, var) (Eq. 4): with s = std_fwd and
        d^2 = s_n^2 - s_prev^2, a = d^2 / s_n^2, b = s_prev^2 / s_n^2, var = s_prev^2 d^2 / s_n^2.
        Applied to the Eq. 11 marginal at n it gives the marginal at prev up to a relative variance error
        below 1e-3 for one step (1.3e-3 for 10-NFE jumps): I2SB's std_fwd^2 and std_bwd^2 both contain beta_t."""
        s_n2, s_p2 = float(self.std_fwd[n]) ** 2, float(self.std_fwd[prev]) ** 2
        d2 = s_n2 - s_p2
        return d2 / s_n2, s_p2 / s_n2, s_p2 * d2 / s_n2

    def sample(self, eps_fn, z1, nfe, noise_fn):
        """I2SB's ddpm_sampling: start at z1 (step T-1); at each of nfe evenly spaced steps predict
        z0^ = z_n - std_fwd[n] eps_fn(z_n, n) and draw z_prev from the posterior (no noise into step 0).
        Returns z at step 0, as I2SB does (not the last z0^)."""
        steps, z = space_indices(len(self.betas), nfe + 1), z1
        for prev, n in zip(steps[-2::-1], steps[:0:-1]):
            z0_hat = z - self.std_fwd[n] * eps_fn(z, n)
            a, b, var = self.coef(prev, n)
            z = a * z0_hat + b * z
            if prev > 0:
                z = z + math.sqrt(var) * noise_fn()
        return z


def timestep_embedding(t, dim, max_period=10000):
    """ADM's sinusoidal embedding of the (continuous) time t (B,) -> (B, dim)."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], 1)


class UNet(nn.Module):
    """ADM UNet as I2SB configures it: res blocks with scale-shift time conditioning, resolution
    changes inside res blocks, attention where the latent resolution is in attn_res, 3 channels in
    (z_t only, Table S7) and out (the Eq. 12 label)."""

    def __init__(self, cfg):
        super().__init__()
        ch, d, heads, emb = cfg['ch'], cfg['embed_dim'], cfg['num_heads'], 4 * cfg['ch']
        res = cfg['image_size'] // 2 ** (len(cfg['ae_mult']) - 1)        # latent resolution
        attn = lambda c, r: [Attention(c, heads)] if r in cfg['attn_res'] else []
        self.ch = ch
        self.time = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.down, skips, c = nn.ModuleList([Blocks([nn.Conv2d(d, ch, 3, padding=1)])]), [ch], ch
        for i, m in enumerate(cfg['ch_mult']):
            for _ in range(cfg['num_res_blocks']):
                self.down.append(Blocks([ResBlock(c, ch * m, emb)] + attn(ch * m, res)))
                c = ch * m
                skips.append(c)
            if i < len(cfg['ch_mult']) - 1:
                self.down.append(Blocks([ResBlock(c, c, emb, 'down')]))
                skips.append(c)
                res //= 2
        self.mid = Blocks([ResBlock(c, c, emb), Attention(c, heads), ResBlock(c, c, emb)])
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(cfg['ch_mult']))):
            for j in range(cfg['num_res_blocks'] + 1):
                layers = [ResBlock(c + skips.pop(), ch * m, emb)] + attn(ch * m, res)
                c = ch * m
                if i and j == cfg['num_res_blocks']:
                    layers.append(ResBlock(c, c, emb, 'up'))
                    res *= 2
                self.up.append(Blocks(layers))
        self.out = nn.Sequential(norm(c), nn.SiLU(), nn.Conv2d(c, d, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, z, t):
        emb = self.time(timestep_embedding(t, self.ch))
        hs = []
        for blocks in self.down:
            z = blocks(z, emb)
            hs.append(z)
        z = self.mid(z, emb)
        for blocks in self.up:
            z = blocks(torch.cat([z, hs.pop()], 1), emb)
        return self.out(z)

# -----------------------------------------------------------------------------
# the model: encode -> bridge to the normal side -> decode -> feature difference (DiAD protocol)


def image_score(amap, kernel, times):
    """DiAD: average-pool the (B,1,H,W) map `times` times (kernel, stride 1), then take the maximum."""
    for _ in range(times):
        amap = F.avg_pool2d(amap, kernel, stride=1)
    return amap.flatten(1).amax(1)


def check_config(cfg):
    """One-line errors for values no network, schedule or sampler here can take; at every build of the
    Model, so for a checkpoint's config with eval.py's inference keys too."""
    if not cfg['ae_mult'] or min(cfg['ae_mult']) < 1 or cfg['ae_ch'] < 1:
        raise common.UserError(f"--ae_mult needs one positive multiplier per autoencoder level and --ae_ch >= 1 "
                               f"(got {cfg['ae_mult']} and {cfg['ae_ch']})")
    f = 2 ** (len(cfg['ae_mult']) - 1 + len(cfg['ch_mult']) - 1)       # autoencoder, then bridge U-Net
    levels = [cfg['image_size'] // 2 ** (len(cfg['ae_mult']) - 1 + i) for i in range(len(cfg['ch_mult']))]
    widths = [cfg['ch'] * m for m, r in zip(cfg['ch_mult'], levels) if r in cfg['attn_res']]   # with attention,
    widths.append(cfg['ch'] * cfg['ch_mult'][-1])                                          # the middle's too
    pool = cfg['score_pool']                       # (kernel, times) of the image score's stride-1 poolings
    for bad, fix in ((cfg['latent'] not in ('prequant', 'quant'), f"--latent must be prequant or quant, got "
                      f"{cfg['latent']!r}"),
                     (cfg['ae_batch_size'] < 1, f"--ae_batch_size must be at least 1 (got {cfg['ae_batch_size']})"),
                     (not 1 <= cfg['nfe'] < cfg['T'] or cfg['n_samples'] < 1,
                      f"--nfe must be in 1..{cfg['T'] - 1} and --n_samples >= 1"),
                     (cfg['image_size'] % f, f"--image_size {cfg['image_size']} must be divisible by {f} (the "
                      "autoencoder's and the bridge U-Net's halvings)"),
                     (cfg['attn_res'] and not set(cfg['attn_res']) & set(levels),     # a typo: no attention
                      f"--attn_res {cfg['attn_res']} matches none of the bridge U-Net's latent resolutions "
                      f"{tuple(levels)}; --attn_res= builds no attention"),
                     (cfg['num_heads'] < 1 or any(w % cfg['num_heads'] for w in widths),
                      f"--num_heads {cfg['num_heads']} must divide each attention width {tuple(widths)}"),
                     (not 0 < cfg['beta_min'] <= cfg['beta_max'], '--beta_min and --beta_max need 0 < beta_min '
                      f"<= beta_max (got {cfg['beta_min']} and {cfg['beta_max']})"),
                     (len(cfg['score_pool']) != 2 or len(cfg['anomaly_beta']) != 2, '--score_pool and --anomaly_beta '
                      f"take two values, e.g. --score_pool 8,8 (got {cfg['score_pool']} and {cfg['anomaly_beta']})"),
                     (len(pool) == 2 and (min(pool) < 0 or pool[0] < 1 or pool[1] * (pool[0] - 1) >= cfg['image_size']),
                      f"--score_pool k,n: n stride-1 poolings of k px shrink the map by n (k - 1) px, which must stay "
                      f"below --image_size {cfg['image_size']} (got {cfg['score_pool']})")):
        if bad:
            raise common.UserError(fix)


class Model(nn.Module):
    INFER_KEYS = ('nfe', 'n_samples', 'pixel_weight', 'sigma', 'score_pool')
    FINAL_STAGE = 2         # common.load refuses stage-1 checkpoints: the bridge is not trained yet
    SCORE_RULE = 'max of the blurred map after score_pool[1] x stride-1 avg_pool2d(score_pool[0]) (DiAD)'

    def __init__(self, cfg):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        try:
            self.ae = VQAE(cfg)
            self.unet = UNet(cfg)            # the EMA weights: I2SB samples with them
        except (ValueError, ZeroDivisionError) as e:     # GroupNorm of a width its group count does not divide
            raise common.UserError(f"--ch {cfg['ch']} --ch_mult {cfg['ch_mult']} --ae_ch {cfg['ae_ch']} --ae_mult "
                                   f"{cfg['ae_mult']}: {e} (GroupNorm: every width it normalises, skips "
                                   'concatenated included, must be a multiple of 4, and of 32 from 128 up; multiples '
                                   'of 32 always work)')
        self.sb = Bridge(cfg)
        try:
            self.backbone = timm.create_model(cfg['backbone'], pretrained=False, features_only=True,
                                              out_indices=cfg['layers']).eval().requires_grad_(False)
            with torch.no_grad():       # a dry run: a ViT, say, takes only the input size it was built for
                self.backbone(torch.zeros(1, 3, cfg['image_size'], cfg['image_size']))
        except (RuntimeError, IndexError, AssertionError) as e:   # unknown name, missing stages, wrong input
            raise common.UserError(f"--backbone {cfg['backbone']} --layers {cfg['layers']}: {e} (layers are "
                                   'feature stages 0-4 of a timm CNN, e.g. resnet50 with 1,2,3)')
        self.register_buffer('scale', torch.tensor(1.0))    # latent scale, set at the end of stage 1
        self.register_buffer('mean', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer('std', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def encode(self, x):
        """Image in [0,1] -> bridge latent z = scale * E(x) (pre-quantisation unless latent='quant')."""
        with common.autocast(x.device, self.cfg['dtype']):
            h = self.ae.encoder(2 * x - 1).float()
        if self.cfg['latent'] == 'quant':
            h = self.ae.vq(h)[0]
        return self.scale * h

    def decode(self, z):
        """Bridge latent -> image in [0,1]: quantise to the codebook, then decode (LDM)."""
        with common.autocast(z.device, self.cfg['dtype']):
            x = self.ae.decoder(self.ae.vq(z / self.scale)[0]).float()
        return ((x + 1) / 2).clamp(0, 1)

    def eps(self, z, n):
        """The (EMA) network's Eq. 12 output at integer step n, for the sampler."""
        t = self.sb.t_net[n].expand(len(z))
        with common.autocast(z.device, self.cfg['dtype']):
            return self.unet(z, t).float()

    def features(self, x):
        """Backbone stages of an image in [0,1], ImageNet-normalised (DiAD)."""
        return self.backbone((x - self.mean) / self.std)

    def feature_distance(self, fx, xr):
        """DiAD: sum over stages of 1 - cos(f_l(x), f_l(x^)) (channels), bilinearly upsampled
        (align_corners=True) to the image size -> (B,1,H,W)."""
        size = xr.shape[-2:]
        return sum(F.interpolate(1 - F.cosine_similarity(a, b, dim=1)[:, None], size=size,
                                 mode='bilinear', align_corners=True) for a, b in zip(fx, self.features(xr)))

    @torch.no_grad()
    def predict(self, batch):
        """Encode, bridge to the normal side (nfe steps, n_samples times), decode, compare (DiAD map)."""
        cfg, x = self.cfg, batch['image']
        z1, fx, k_max = self.encode(x), self.features(x), cfg['n_samples']
        fmap = pmap = recon = 0
        for k in range(k_max):   # per-sample noise keyed by (seed, path, k): batch-size invariant
            gens = [common.generator(cfg['seed'], p, k) for p in batch['path']]
            noise = lambda: torch.stack([torch.randn(z1.shape[1:], generator=g) for g in gens]).to(x.device)
            xr = self.decode(self.sb.sample(self.eps, z1, cfg['nfe'], noise))
            fmap = fmap + self.feature_distance(fx, xr) / k_max           # the supplement's 2x/4x/8x:
            pmap = pmap + (x - xr).abs().mean(1, keepdim=True) / k_max     # maps averaged over samples
            if k == 0:
                recon = xr                                                 # the first sample is shown
        fmap, pmap = common.gaussian_blur(fmap, cfg['sigma']), common.gaussian_blur(pmap, cfg['sigma'])
        amap = fmap + cfg['pixel_weight'] * pmap
        pool = functools.partial(image_score, kernel=cfg['score_pool'][0], times=cfg['score_pool'][1])
        return dict(map=amap[:, 0], score=pool(amap), recon=recon,
                    scores=dict(feature=pool(fmap), pixel=pool(pmap)),
                    nfe=dict(unet=cfg['nfe'] * k_max, encoder=1, decoder=k_max, backbone=1 + k_max))

# -----------------------------------------------------------------------------
# training: stage 1 (autoencoder), then stage 2 (bridge); one checkpoint file with the stage in it


@torch.no_grad()
def encode_all(model, images, device, chunk=64):
    """Bridge latents of uint8 images (N,3,H,W), encoded in chunks."""
    return torch.cat([model.encode(images[i:i + chunk].float().to(device) / 255)
                      for i in range(0, len(images), chunk)])


def prepare_backbone(model, data, cfg):
    """Pretrained ImageNet weights (DiAD) from the timm cache or a file; else (offline default) the
    random init with BatchNorm statistics re-estimated on up to 1024 normal training images."""
    if cfg['backbone_weights']:
        return common.load_pretrained(model.backbone, cfg['backbone'], cfg['backbone_weights'])
    if cfg['preset'] == 'paper':
        common.print0('note: no --backbone_weights, so the anomaly map uses a random-init backbone (offline '
                      "default); the paper's map needs ImageNet weights: --backbone_weights timm (or a file)")
    idx = torch.randperm(len(data), generator=common.generator(cfg['seed'], 'bn'))[:1024]   # shuffled:
    x = data.images[idx].float() / 255                  # one-category batches would skew the statistics
    common.recalibrate_bn(model.backbone, ((x[i:i + 64].to(cfg['device']) - model.mean) / model.std
                                           for i in range(0, len(x), 64)))
    return dict(id=f"{cfg['backbone']} random init (seed {cfg['seed']}), BatchNorm recalibrated",
                file='', sha256='')


def progress(cfg, stage, step, total, clock, msg):
    """One log line per log_interval (rank 0); the checkpoint is written by the caller."""
    now = time.time()
    if (step % cfg['log_interval'] == 0 or step == total) and common.rank_world()[0] == 0:
        speed = (step - clock['step']) / max(now - clock['tick'], 1e-9)
        tqdm.write(f'stage {stage} | step {step}/{total} | {msg} | {speed:.1f} it/s')   # above the bar
        clock.update(step=step, tick=now)
    return clock['seconds'] + now - clock['start']


def train_autoencoder(model, data, val, cfg, ckpt, clock):
    """Stage 1: the VQ autoencoder on normal training images (L1 + SSIM + commitment, EMA codebook)."""
    ae, device, rank = model.ae.train(), cfg['device'], common.rank_world()[0]
    path, step = os.path.join(cfg['out_dir'], 'ckpt.pt'), ckpt['step'] if ckpt else 0
    opt = torch.optim.Adam(ae.parameters(), lr=cfg['ae_lr'], betas=(0.5, 0.9))   # LDM's betas
    if ckpt:
        common.load_optimizer(opt, ckpt['opt'])
    batches = common.train_batches(data, cfg, step, size_key='ae_batch_size')
    # fixed shapes: with dynamic ones, Inductor failed to compile the decoder (torch 2.14, CPU)
    enc, dec = (torch.compile(m, dynamic=False) if cfg['compile'] else m for m in (ae.encoder, ae.decoder))
    clock.update(step=step, tick=time.time())
    for step in tqdm(range(step, cfg['ae_steps']), desc='stage 1', disable=rank > 0, leave=False):
        x = next(batches)['image'].to(device)
        with common.autocast(device, cfg['dtype']):
            h = enc(2 * x - 1)
            q, commit, idx = ae.vq(h)
            xr = (dec(q).float() + 1) / 2
        l1 = (xr - x).abs().mean()
        loss = l1 + cfg['ssim_weight'] * (1 - ssim(xr, x)) + commit
        common.check_finite(loss, step, path)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        common.all_reduce_grads(ae.parameters())
        opt.step()
        ae.vq.update(h.detach(), idx, common.generator(cfg['seed'], rank, 'vq', step, device=device))
        seconds = progress(cfg, 1, step + 1, cfg['ae_steps'], clock,
                           f'loss {loss.item():.4f} | l1 {l1.item():.4f} | commit {commit.item():.4f} | '
                           f"codes {int((ae.vq.idle == 0).sum())}/{cfg['n_embed']} | lr {cfg['ae_lr']:.1e}")
        if (step + 1) % cfg['ckpt_interval'] == 0 or step + 1 == cfg['ae_steps']:
            common.save(path, model, stage=1, step=step + 1, final=False, opt=opt.state_dict(),
                        train_seconds=seconds)
    finish_autoencoder(model, data, val, cfg)


@torch.no_grad()
def finish_autoencoder(model, data, val, cfg):
    """Freeze the autoencoder, report its validation error and codebook usage (kept in the checkpoint
    as ae.vq.usage), and set the latent scale (docstring: latent scale [G])."""
    ae = model.ae.eval().requires_grad_(False)
    model.scale.fill_(1.0)
    z = encode_all(model, data.images, cfg['device'])                   # unscaled training latents
    ae.vq.usage.copy_(torch.bincount(ae.vq.codes(z).flatten(), minlength=cfg['n_embed']).float())
    model.scale.fill_(cfg['latent_scale'] or 1 / float(z.std()))
    p = ae.vq.usage / ae.vq.usage.sum()
    perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    val = val.images[:64].float().to(cfg['device']) / 255
    l1 = float((model.decode(model.encode(val)) - val).abs().mean())
    common.print0(f"stage 1 done | val L1 {l1:.4f} | codebook {int((ae.vq.usage > 0).sum())}/{cfg['n_embed']} "
                  f'codes used, perplexity {perplexity:.0f} | latent std {float(z.std()):.3f}, '
                  f'scale {float(model.scale):.3f}')


@torch.no_grad()
def latent_pair(model, batch, z_train, row, device):
    """(z0, z1) = (E(x), E(x~)) of a batch from common.perlin_anomaly: E(x) comes from the cache of
    training latents; samples that got no anomaly (label 0) are identity pairs, z1 = z0."""
    z0 = z_train[[row[p] for p in batch['path']]]
    z1, hit = z0.clone(), batch['label'].bool().to(device)
    if hit.any():
        z1[hit] = model.encode(batch['image'].to(device)[hit])
    return z0, z1


@torch.no_grad()
def ema_update(ema, net, step, decay):
    """EMA of the weights with torch_ema's warm-up, as I2SB: decay_n = min(decay, (1 + n) / (10 + n)),
    n = the updates before this one (torch_ema counts this one too: a one-update offset, 1/10 vs 2/11)."""
    d = min(decay, (1 + step) / (10 + step))
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p, 1 - d)


def train_bridge(model, data, cfg, ckpt, clock):
    """Stage 2: I2SB between latents of anomalous (z1) and normal (z0) versions of the same image."""
    device, rank, sb = cfg['device'], common.rank_world()[0], model.sb
    path, step = os.path.join(cfg['out_dir'], 'ckpt.pt'), ckpt['step'] if ckpt else 0
    net = UNet(cfg).to(device)                      # trained weights; model.unet holds their EMA
    net.load_state_dict(ckpt['net'] if ckpt else model.unet.state_dict())
    opt = torch.optim.AdamW(net.parameters(), lr=cfg['lr'], weight_decay=0.0)
    if ckpt:
        common.load_optimizer(opt, ckpt['opt'])
    z_train = encode_all(model, data.images, device)    # z0 = E(x) of every training image, once:
    row = {p: i for i, p in enumerate(data.paths)}      # the autoencoder is frozen
    perlin = functools.partial(common.perlin_anomaly, p=cfg['anomaly_p'], beta=cfg['anomaly_beta'],
                               dtd_root=cfg['dtd_root'])
    batches = common.train_batches(data, cfg, step, perlin)
    fwd = torch.compile(net) if cfg['compile'] else net
    clock.update(step=step, tick=time.time())
    for step in tqdm(range(step, cfg['steps']), desc='stage 2', disable=rank > 0, leave=False):
        z0, z1 = latent_pair(model, next(batches), z_train, row, device)
        g = common.generator(cfg['seed'], rank, 'bridge', step, device=device)
        n = torch.randint(cfg['T'], (len(z0),), generator=g, device=g.device).to(device)   # uniform steps (I2SB)
        zt = sb.q_sample(n, z0, z1, torch.randn(z0.shape, generator=g, device=g.device).to(device))   # Eq. 11
        with common.autocast(device, cfg['dtype']):
            out = fwd(zt, sb.t_net[n]).float()
        loss = F.mse_loss(out, sb.label(n, z0, zt))                           # Eq. 12
        common.check_finite(loss, step, path)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        common.all_reduce_grads(net.parameters())
        lr = cfg['lr'] * cfg['lr_gamma'] ** (step // 1000)                    # I2SB's StepLR(1000)
        for group in opt.param_groups:
            group['lr'] = lr
        opt.step()
        ema_update(model.unet, net, step, cfg['ema_decay'])
        seconds = progress(cfg, 2, step + 1, cfg['steps'], clock, f'loss {loss.item():.4f} | lr {lr:.1e}')
        if (step + 1) % cfg['ckpt_interval'] == 0 or step + 1 == cfg['steps']:
            common.save(path, model, stage=2, step=step + 1, final=step + 1 == cfg['steps'], net=net.state_dict(),
                        opt=opt.state_dict(), train_seconds=seconds)


def train(cfg):
    """Stage 1 then stage 2; with --resume, continue exactly from out_dir/ckpt.pt (either stage).
    Returns (model in eval mode, training seconds)."""
    common.seed_everything(cfg['seed'])            # before any per-rank seeding: one init on all ranks
    model, ckpt = common.resume(cfg, Model) if cfg['resume'] else (Model(cfg).to(cfg['device']), None)
    cfg = model.cfg                                # the checkpoint's, when resuming (common.resume)
    if ckpt and ckpt['stage'] == 2:                # stage 1's keys would be printed and saved, yet unused
        common.refuse_spent(cfg, ckpt['config'], STAGE1_KEYS, 'stage 1 (the autoencoder and its latent scale)')
    data = common.load_dataset(cfg, 'train')
    if ckpt is None:
        cfg['backbone_record'] = prepare_backbone(model, data, cfg)
    if cfg['preset'] == 'paper' and not cfg['dtd_root']:
        common.print0("note: no --dtd_root, so the anomalies take procedural textures or shuffled copies of the "
                      "image; DRAEM's recipe takes DTD (www.robots.ox.ac.uk/~vgg/data/dtd, then --dtd_root DIR)")
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
    common.print0(f"parameters: autoencoder {count(model.ae):.2f} M | bridge UNet {count(model.unet):.2f} M "
                  f"(ch {cfg['ch']}; Table S7 says 224, the S4 text 320) | backbone {count(model.backbone):.2f} M "
                  f"({cfg['backbone_record']['id']})")
    clock = dict(seconds=ckpt['train_seconds'] if ckpt else 0.0, start=time.time())
    if ckpt is None or ckpt['stage'] == 1:
        train_autoencoder(model, data, common.load_dataset(cfg, 'val'), cfg, ckpt, clock)
        ckpt = None
    else:
        model.ae.eval().requires_grad_(False)
    train_bridge(model, data, cfg, ckpt, clock)
    return model.eval(), clock['seconds'] + time.time() - clock['start']


def main(argv=None):
    common.run(common.get_config(config, PRESETS, argv, __file__, __doc__), train, Model)


if __name__ == '__main__':
    common.cli(main)
