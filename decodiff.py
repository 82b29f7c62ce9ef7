"""
DeCo-Diff: Correcting Deviations from Normality, a reformulated diffusion model for multi-class
unsupervised anomaly detection (Beizaee, Lodygensky, Desrosiers, Dolz; CVPR 2025). Minimal
re-implementation.

Idea. Work in the latent space of a KL-f8 autoencoder and treat an anomaly as noise there. During
training, random latent patches of a normal image are diffused while the rest stay exactly as they
are (Eq. 7), and a U-Net learns the "direction of deviation" eta (Eq. 11), which is zero wherever
the latent is untouched (the paper after Eq. 11; the official target is masked so). At test time
nothing is noised: the clean latent of the test image is corrected by a few deterministic DDIM-like
steps (Eq. 13-14). Normal patches stay put, anomalous ones move towards normality, and the anomaly
map is the geometric mean of the clipped pixel and latent discrepancies between the corrected and
the original latent (Eq. 15).

Implemented: the squared-cosine schedule (T=10), masked forward process (Eq. 7) with shuffled-patch
noise, the eta target and loss (Eq. 11-12), deviation correction with the z~_{t-1} (Eq. 14) and the
z~_0 strategies (Table 3), the map (Eq. 15) with the official code's reductions and blurs.

Two autoencoders, both the same diffusers-compatible KL network (`AutoencoderKL` below):
- vae='sd': the pretrained Stable Diffusion VAE the paper uses (stabilityai/sd-vae-ft-ema, latent
  scale 0.18215). Its state dict has the keys of diffusers' AutoencoderKL, so a downloaded
  diffusion_pytorch_model.safetensors/.bin loads from --vae_weights (old and new attention key
  names both work; tests/decodiff_vae_manifest.json pins the key -> shape list).
- vae='small' (offline/synthetic default): a small KL autoencoder (f = 2^(levels-1)) trained here,
  first, on the training images (L1 + KL), then frozen; latents scaled to unit variance (as 0.18215
  does for the SD VAE). A checkpoint holds either autoencoder, so evaluation needs no download.
  DeCo-Diff needs an autoencoder that encodes ANY content faithfully (the SD VAE saw billions of
  images), so that an anomaly is present in z0 and only the corrector removes it. An AE trained on
  normal images only is itself a normality prior that erases anomalies, so the small AE also sees
  a Perlin anomaly (common.perlin_anomaly, DRAEM's recipe) on ae_anomaly=0.5 of its training images.
  Only the autoencoder sees them; the corrector trains on normal latents, as in the paper.

Deviations from paper and official code (farzad-bz/DeCo-Diff), and assumptions:
- Unconditional U-Net by default (the paper's reading). The official code also feeds the category
  id through cross-attention at train AND test time (a class-aware model, never mentioned in the
  paper; its UNet-L has 395.0 M parameters): --class_cond reproduces it.
- The paper's protocol resizes to 288 and center-crops 256; here the full image is resized to
  image_size and evaluated by eval.py's common protocol (no crop). No training augmentation (the
  official fixed +4 px shift and VisA rot180 are omitted; the paper mentions none).
- One latent patch size per batch (the official code; needed to shuffle patches across the batch),
  drawn from {1,2,4,8} with the paper-era code's probabilities (.4,.3,.2,.1); the paper is silent.
  The current official code's {1,...,16} (.3,.25,.2,.15,.1) lowered the tiny preset's validation
  proxy (below; seed 0: 90.2 / 84.0 -> 84.1 / 82.8 image / pixel AUROC).
- The learning rate follows warm-up and cosine per step (1e-4 -> 1e-5, as the paper says), not per
  epoch as the official code. The training set is train/good minus val_frac=0.1, like the
  official MVTec split (the validation part is unused there too); on VisA all of train/good, like
  the official 1cls split (val_frac 0 unless typed).
- gamma_l = 0.4, the paper's main-results setting (supp. Tab. 2, marked *); the official code
  now uses 0.2 (better pixel AP, lower image AUROC): --gamma_l 0.2. Blurs: sigma 3 px on the pixel
  term and 1 latent px on the latent term at 256 px (f8: 32x32 latents), as the official code, and,
  going with gamma_l 0.4, the paper-era code's final blur of the map, sigma 1 px (--sigma_map 0:
  the current code's map). sigma_pix and sigma_map scale with image_size/256, sigma_lat with latent
  size/32 (the same share of the image at any size). The pixel term compares D(z~0) with D(z0), so
  autoencoder error does not enter the map. The latent term is upsampled by torch's bilinear
  interpolation, which repeats the border latent where the official skimage resize mirrors it: only
  the outer 4 px of a 256 px map differ (for uniform random latent maps by 0.0007 on average).
- S reverse steps use the official respacing (t = 0, k, 2k, ... < T with S values): S=5 gives
  t = 8,6,4,2,0; S must be 2, 3, 4, 5 or 10 (the released code cannot run S=1 either).
- Training latents are posterior samples, test latents the posterior mean (official code). As the
  autoencoder is frozen and nothing is augmented, the training set is encoded once and a fresh
  posterior sample is drawn per step, which is the same as encoding every step.
- No gradient checkpointing (the official code checkpoints its transformer blocks to fit batch 128
  on one 48 GB GPU): if memory runs out, split the batch over GPUs with torchrun. The global RNG
  (dropout) is reseeded from (seed, rank, stage, step) every step, so --resume is exact.
  GroupNorm: 32 groups at >= 128 channels (every SD VAE layer), c/4 groups below, for the tiny
  widths; so --ch 64 (the official XS size) has 16 groups in its 64-channel layers where the
  official code has 32 (the default L and S, M, XL match it).
- Tiny preset (synthetic, CPU; values from scale arguments and the validation split, never the
  test set): the small AE is f4, not f8, so the 128 px images give the paper's 32x32 latent grid
  (256 px / 8) and the paper's patch sizes {1,2,4,8} keep their meaning. At f8 (16x16 latents, each
  covering 8x8 of only 128 px) the tiny AE blurs anomalies away: on validation images with pasted
  Perlin anomalies its error inside them was 2-4x that outside, and |D(z0) - x| alone localised them
  better (86 pixel AUROC) than the DeCo-Diff map (76), gamma and blur variants moving it by < 1.5.
  f4 raised that validation proxy (16 normal + 32 Perlin images per category) from 82.7 / 76.8 to
  88.2 / 80.3 image / pixel AUROC (ae_anomaly alone, at f8: 81.2 / 76.0 -> 82.7 / 76.8).
  AE: widths 16,32,64 (0.68 M), 1000 steps of 8 images on 64 px crops. Widths 8,16,32 (0.17 M)
  erased more of each anomaly in z0 (its own error |D(z0) - x| localised them better than the
  DeCo-Diff map); the wider AE moved the proxy, mean of seeds 0-2, from 88.5 / 81.5 to 88.0 / 83.0
  (it costs 1.8x the inference time: the decoder runs twice per image). It gains more from
  optimiser steps than from images per step (proxy, seed 0: 500 steps of 16 images 90.2 / 84.0;
  1000 of 8, the same CPU, 91.6 / 85.3; 1000 of 16 93.2 / 87.8, but over the 10-minute budget; 500
  of 16 at twice the lr 87.1 / 83.6; 1000 of 16 on 48 px crops 89.6 / 86.1; mean of seeds 0-2: 500
  of 16 88.0 / 83.0, 1000 of 8 91.9 / 85.0). U-Net: width 32, mults
  1,2,2, one res block, attention at 8x8 (256-token attention at 16x16 costs too much CPU), no
  dropout (short run), 1000 steps, batch 16, lr 1e-3 -> 1e-4 (a small net, few steps).

$ python decodiff.py                                          # tiny, synthetic, train + evaluate (CPU)
$ python decodiff.py --data mvtec --train --vae sd --vae_weights sd-vae-ft-ema/   # paper (GPU)
$ python decodiff.py --data mvtec --eval                      # evaluate the saved checkpoint
$ python eval.py out/decodiff_mvtec_all_paper_s0/ckpt.pt --S 2 --strategy z0 --gamma_l 0.2
"""
import functools
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common

# -----------------------------------------------------------------------------
# config: BASE_CONFIG (data, system, ...) plus DeCo-Diff's keys; defaults are the paper's

config = dict(
    common.BASE_CONFIG,
    batch_size=128,             # global batch (paper: 128)
    image_size=256,             # network input (paper: 288 resize + 256 crop, here a plain resize)
    # autoencoder
    vae='sd',                   # sd: pretrained SD VAE (needs vae_weights) | small: trained here first
    vae_weights='',             # sd-vae-ft-ema diffusers weights: .safetensors/.bin file or its folder
    ae_channels=(32, 64, 64, 64),  # small AE: widths per level (4 = f8, 3 = f4; SD: 128,256,512,512)
    ae_res_blocks=1,            # small AE: res blocks per level (SD: 2)
    ae_crop=0,                  # small AE: train on random crops of this size (0 = whole images)
    ae_steps=2000,              # small AE: training steps (stage 1)
    ae_batch_size=0,            # small AE: global batch; 0 = batch_size
    ae_lr=1e-3,                 # small AE: AdamW learning rate (warm-up, cosine to 0)
    ae_kl=1e-6,                 # small AE: KL weight (LDM's KL-f8 autoencoder uses 1e-6)
    ae_anomaly=0.5,             # small AE: share of its training images with a pasted Perlin anomaly
    # corrector U-Net (LDM-style; paper supp. D.1: size L)
    ch=256,                     # base width (official sizes XS/S/M/L/XL: 64/128/192/256/320)
    ch_mult=(1, 2, 4),          # width multipliers per level
    num_res_blocks=2,           # res blocks per level
    attn_ds=(1, 2, 4),          # downsample factors with a transformer block (paper: {4,2,1} = all)
    head_dim=32,                # channels per attention head (official: 16 for XS, 32 for S-L)
    dropout=0.4,                # res block dropout (official 0.4)
    class_cond=False,           # official code: cross-attend to a category embedding (not in paper)
    n_classes=0,                # categories seen in training (set from the data; for class_cond)
    # training: Eq. 7, 11, 12
    T=10,                       # diffusion steps (squared-cosine betas capped at 0.999)
    steps=0,                    # corrector steps; 0 = epochs over the training set at batch_size
    epochs=0,                   # used when steps=0; 0 = the paper's: 200 on VisA, 800 otherwise
    lr=1e-4,                    # AdamW peak learning rate, cosine to min_lr after warm-up
    min_lr=1e-5,                # final learning rate (paper: "decaying to a minimum of 1e-5")
    weight_decay=1e-4,          # AdamW weight decay (official)
    warmup_steps=0,             # linear warm-up; 0 = 10 epochs (official)
    patch_sizes=(1, 2, 4, 8),   # latent patch sizes of the masks (8-64 px at 256 px)
    patch_probs=(0.4, 0.3, 0.2, 0.1),  # their probabilities (paper-era official code)
    r_mask=0.7,                 # masked (noised) patch ratio ~ U[0, r_mask]
    r_shuffle=0.3,              # share of noised patches filled with shuffled patches ~ U[0, r_shuffle]
    # inference and anomaly map: Eq. 13-15
    S=5,                        # reverse steps (5: t = 8,6,4,2,0); one of 2, 3, 4, 5, 10
    strategy='z_prev',          # z_prev: Eq. 14 (z~_{t-1}) | z0: continue from z~_0 (Table 3)
    gamma_p=0.4,                # pixel threshold, on [-1,1] images (Eq. 15)
    gamma_l=0.4,                # latent threshold (paper 0.4; official code 0.2)
    sigma_pix=3.0,              # Gaussian blur of the pixel term: pixels at 256 px (x image_size/256)
    sigma_lat=1.0,              # Gaussian blur of the latent term: latent px of a 32x32 latent (x size/32)
    sigma_map=1.0,              # Gaussian blur of the final map: pixels at 256 px (paper-era code; current 0)
)
del config['backbone_weights']   # a shared key this method has no use for (its pretrained VAE: --vae_weights)
# keys that older checkpoints and results.json hold under other names (old: new; common.current_names)
RENAMED = dict(ae_layers='ae_res_blocks')
AE_KEYS = ('ae_crop', 'ae_steps', 'ae_batch_size', 'ae_lr', 'ae_kl', 'ae_anomaly')   # the small AE's training
PRESETS = {
    'paper': dict(),
    'tiny': dict(batch_size=16, image_size=128, vae='small', ae_channels=(16, 32, 64), ae_res_blocks=1,
                 ae_crop=64, ae_steps=1000, ae_batch_size=8, ae_lr=2e-3, ch=32, ch_mult=(1, 2, 2),
                 num_res_blocks=1, attn_ds=(4,), head_dim=16, dropout=0.0, steps=1000, lr=1e-3,
                 min_lr=1e-4, warmup_steps=50, log_interval=100, ckpt_interval=500),
}
SD_VAE = dict(channels=(128, 256, 512, 512), layers=2, scale=0.18215)   # sd-vae-ft-ema config.json
OFFICIAL_PARAMS = {64: 24.7, 128: 98.8, 192: 222.2, 256: 395.0, 320: 614.0}   # class-conditioned, M

# -----------------------------------------------------------------------------
# schedule: squared-cosine betas (Nichol & Dhariwal), T = 10


def cosine_betas(T, s=0.008):
    """beta_i = min(1 - f((i+1)/T) / f(i/T), 0.999), f(u) = cos^2((u + s)/(1 + s) pi/2)."""
    f = [math.cos((i / T + s) / (1 + s) * math.pi / 2) ** 2 for i in range(T + 1)]
    return torch.tensor([min(1 - f[i + 1] / f[i], 0.999) for i in range(T)], dtype=torch.float64)


def respaced(T, S):
    """The official respacing: the first stride k with S values in range(0, T, k) (S=5: 0,2,4,6,8)."""
    for k in range(1, T):
        if len(range(0, T, k)) == S:
            return list(range(0, T, k))
    valid = sorted({len(range(0, T, k)) for k in range(1, T)})
    raise common.UserError(f'--S {S} is not a valid number of reverse steps for T={T}; choose one of {valid}'
                           if valid else f'--T must be at least 2 (got {T})')


def norm(c, eps=1e-5):
    """GroupNorm with 32 groups (LDM, diffusers) for >= 128 channels; c/4 groups below (see the docstring)."""
    return nn.GroupNorm(min(32, c // 4), c, eps=eps)

# -----------------------------------------------------------------------------
# KL-f8 autoencoder with diffusers' AutoencoderKL state-dict keys (sd-vae-ft-ema and the small one)


class VAEResnet(nn.Module):
    """diffusers ResnetBlock2D without time embedding: GN-SiLU-conv twice, 1x1 shortcut."""

    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = norm(cin, 1e-6), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = norm(cout, 1e-6), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.conv_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (self.conv_shortcut(x) if hasattr(self, 'conv_shortcut') else x) + h


class VAEAttention(nn.Module):
    """Single-head self-attention of the mid block (diffusers names; the old ones are renamed on load)."""

    def __init__(self, c):
        super().__init__()
        self.group_norm = norm(c, 1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)                       # (B, HW, C)
        h = F.scaled_dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h))
        return x + self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)


class Resample(nn.Module):
    """down: pad right/bottom by 1, 3x3 conv stride 2 (diffusers Downsample2D, padding 0);
    up: nearest x2, 3x3 conv (Upsample2D)."""

    def __init__(self, c, down):
        super().__init__()
        self.down, self.conv = down, nn.Conv2d(c, c, 3, stride=2 if down else 1, padding=0 if down else 1)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.down else F.interpolate(x, scale_factor=2.0))


def stage(resnets, **more):
    """A container with diffusers' attribute names: resnets, attentions, downsamplers, upsamplers."""
    m = nn.Module()
    m.resnets = nn.ModuleList(resnets)
    for name, mods in more.items():
        setattr(m, name, nn.ModuleList(mods))
    return m


def mid_block(c):
    return stage([VAEResnet(c, c), VAEResnet(c, c)], attentions=[VAEAttention(c)])


def run_mid(m, x):
    return m.resnets[1](m.attentions[0](m.resnets[0](x)))


class Encoder(nn.Module):
    def __init__(self, chans, layers, zc=4):
        super().__init__()
        self.conv_in = nn.Conv2d(3, chans[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([stage(
            [VAEResnet(chans[max(i - 1, 0)] if j == 0 else c, c) for j in range(layers)],
            downsamplers=[Resample(c, True)] if i < len(chans) - 1 else []) for i, c in enumerate(chans)])
        self.mid_block = mid_block(chans[-1])
        self.conv_norm_out, self.conv_out = norm(chans[-1], 1e-6), nn.Conv2d(chans[-1], 2 * zc, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for blk in self.down_blocks:
            for m in list(blk.resnets) + list(blk.downsamplers):
                x = m(x)
        return self.conv_out(F.silu(self.conv_norm_out(run_mid(self.mid_block, x))))


class Decoder(nn.Module):
    def __init__(self, chans, layers, zc=4):
        super().__init__()
        rev = chans[::-1]
        self.conv_in = nn.Conv2d(zc, rev[0], 3, padding=1)
        self.mid_block = mid_block(rev[0])
        self.up_blocks = nn.ModuleList([stage(
            [VAEResnet(rev[max(i - 1, 0)] if j == 0 else c, c) for j in range(layers + 1)],
            upsamplers=[Resample(c, False)] if i < len(rev) - 1 else []) for i, c in enumerate(rev)])
        self.conv_norm_out, self.conv_out = norm(chans[0], 1e-6), nn.Conv2d(chans[0], 3, 3, padding=1)

    def forward(self, z):
        x = run_mid(self.mid_block, self.conv_in(z))
        for blk in self.up_blocks:
            for m in list(blk.resnets) + list(blk.upsamplers):
                x = m(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """The LDM KL-f8 autoencoder as diffusers lays it out: images in [-1,1] -> a diagonal Gaussian
    posterior over (4, H/8, W/8) latents (mean, logvar) -> images."""

    def __init__(self, channels, layers):
        super().__init__()
        self.encoder, self.decoder = Encoder(channels, layers), Decoder(channels, layers)
        self.quant_conv, self.post_quant_conv = nn.Conv2d(8, 8, 1), nn.Conv2d(4, 4, 1)

    def encode(self, x):
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


DEPRECATED = {'.query.': '.to_q.', '.key.': '.to_k.', '.value.': '.to_v.', '.proj_attn.': '.to_out.0.'}


def load_vae_weights(vae, path):
    """Load diffusers AutoencoderKL weights (sd-vae-ft-ema) from a .safetensors/.bin file or a folder
    holding one (also in vae/). Old checkpoints name the attention query/key/value/proj_attn."""
    if os.path.isdir(path):
        found = [os.path.join(path, d, f) for d in ('', 'vae') for f in
                 ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin')]
        path = next((f for f in found if os.path.isfile(f)), path)
    if not os.path.isfile(path):
        raise common.UserError(f'no VAE weights at {path!r}: download diffusion_pytorch_model.safetensors '
                               'of stabilityai/sd-vae-ft-ema and pass --vae_weights FILE (or its folder)')
    state = common.read_weights(path)
    for old, new in DEPRECATED.items():
        state = {k.replace(old, new): v for k, v in state.items()}
    own = vae.state_dict()
    state = {k: v.reshape(own[k].shape) if k in own and v.numel() == own[k].numel() else v
             for k, v in state.items()}   # very old files store attention weights as 1x1 convs
    bad = sorted(k for k in own if k not in state or state[k].shape != own[k].shape)
    if bad or len(state) != len(own):
        raise common.UserError(f'{path} is not an sd-vae-ft-ema AutoencoderKL: {len(bad)} missing or '
                               f'mis-shaped keys (e.g. {bad[:2]}), {len(state) - len(own) + len(bad)} unexpected')
    vae.load_state_dict(state)
    return dict(id='stabilityai/sd-vae-ft-ema', file=os.path.basename(path), sha256=common.file_sha256(path))

# -----------------------------------------------------------------------------
# eta_theta: an LDM U-Net (openaimodel with SpatialTransformer blocks), predicting eta


def timestep_embedding(t, dim):
    """LDM sinusoid [cos, sin] of the raw timestep (0..T-1)."""
    freqs = torch.exp(-math.log(10000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def zero(module):
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class ResBlock(nn.Module):
    """GN-SiLU-conv, + Linear(SiLU(temb)), GN-SiLU-dropout-conv (zero-initialised), 1x1 skip."""

    def __init__(self, cin, cout, temb, dropout):
        super().__init__()
        self.in_layers = nn.Sequential(norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(temb, cout))
        self.out_layers = nn.Sequential(norm(cout), nn.SiLU(), nn.Dropout(dropout),
                                        zero(nn.Conv2d(cout, cout, 3, padding=1)))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class Attention(nn.Module):
    """Multi-head (cross-)attention; keys/values from context if given (LDM CrossAttention)."""

    def __init__(self, dim, heads, context_dim=None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x, context=None):
        ctx = x if context is None else context
        split = lambda y: y.unflatten(-1, (self.heads, -1)).transpose(1, 2)    # (B, heads, N, d)
        h = F.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(ctx)), split(self.to_v(ctx)))
        return self.to_out(h.transpose(1, 2).flatten(2))


class Transformer(nn.Module):
    """SpatialTransformer, depth 1: GN, 1x1 in; x += self-attn; [x += cross-attn to the class
    token]; x += GEGLU feed-forward (x4); zero-initialised 1x1 out, residual."""

    def __init__(self, c, heads, context_dim=None):
        super().__init__()
        self.norm, self.proj_in = norm(c, 1e-6), nn.Conv2d(c, c, 1)
        self.norm1, self.attn1 = nn.LayerNorm(c), Attention(c, heads)
        if context_dim:
            self.norm2, self.attn2 = nn.LayerNorm(c), Attention(c, heads, context_dim)
        self.norm3, self.geglu, self.ff_out = nn.LayerNorm(c), nn.Linear(c, 8 * c), nn.Linear(4 * c, c)
        self.proj_out = zero(nn.Conv2d(c, c, 1))

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)                # (B, HW, C)
        h = h + self.attn1(self.norm1(h))
        if hasattr(self, 'attn2'):
            h = h + self.attn2(self.norm2(h), context)
        a, gate = self.geglu(self.norm3(h)).chunk(2, dim=-1)
        h = h + self.ff_out(a * F.gelu(gate))
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class Block(nn.Module):
    """One U-Net entry: a res block, an optional transformer, an optional resampling."""

    def __init__(self, res=None, attn=None, resample=None):
        super().__init__()
        self.res, self.attn, self.resample = res, attn, resample

    def forward(self, x, emb, context):
        x = self.res(x, emb) if self.res is not None else x
        x = self.attn(x, context) if self.attn is not None else x
        return self.resample(x) if self.resample is not None else x


class UNet(nn.Module):
    """eta_theta(z_t, t[, class]): LDM U-Net, transformer blocks at the downsample factors attn_ds."""

    def __init__(self, cfg):
        super().__init__()
        C, mults, nres, p = cfg['ch'], cfg['ch_mult'], cfg['num_res_blocks'], cfg['dropout']
        ctx = 2 * C if cfg['class_cond'] else None             # official context_dim = 2 C
        self.time_embed = nn.Sequential(nn.Linear(C, 4 * C), nn.SiLU(), nn.Linear(4 * C, 4 * C))
        self.class_embed = nn.Embedding(max(cfg['n_classes'], 1), ctx) if ctx else None

        def block(cin, cout, ds, resample=None):
            attn = Transformer(cout, cout // cfg['head_dim'], ctx) if ds in cfg['attn_ds'] else None
            return Block(ResBlock(cin, cout, 4 * C, p), attn, resample)
        self.conv_in, self.down, skips, ch, ds = nn.Conv2d(4, C, 3, padding=1), nn.ModuleList(), [C], C, 1
        for level, m in enumerate(mults):
            for _ in range(nres):
                self.down.append(block(ch, m * C, ds))
                ch = m * C
                skips.append(ch)
            if level < len(mults) - 1:
                self.down.append(Block(resample=nn.Conv2d(ch, ch, 3, stride=2, padding=1)))
                skips.append(ch)
                ds *= 2
        self.mid = nn.ModuleList([Block(ResBlock(ch, ch, 4 * C, p), Transformer(ch, ch // cfg['head_dim'], ctx)),
                                  Block(ResBlock(ch, ch, 4 * C, p))])       # LDM: attention always
        self.up = nn.ModuleList()
        for level, m in reversed(list(enumerate(mults))):
            for i in range(nres + 1):
                up = nn.Sequential(nn.Upsample(scale_factor=2.0), nn.Conv2d(m * C, m * C, 3, padding=1))
                self.up.append(block(ch + skips.pop(), m * C, ds, up if level and i == nres else None))
                ch = m * C
            ds //= 2
        self.out = nn.Sequential(norm(ch), nn.SiLU(), zero(nn.Conv2d(ch, 4, 3, padding=1)))

    def forward(self, z, t, cls=None):
        emb = self.time_embed(timestep_embedding(t, self.time_embed[0].in_features))
        context = self.class_embed(cls)[:, None] if self.class_embed is not None else None   # (B,1,d)
        h, skips = self.conv_in(z), []
        skips.append(h)
        for blk in self.down:
            h = blk(h, emb, context)
            skips.append(h)
        for blk in self.mid:
            h = blk(h, emb, context)
        for blk in self.up:
            h = blk(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)

# -----------------------------------------------------------------------------
# training: random patch masks, shuffled-patch noise, the masked forward process and eta (Eq. 7-12)


def random_patch_mask(ratio, size, p, gen):
    """m (B,1,size,size), 1 = visible patch, 0 = noised: per sample floor(n (1 - ratio)) of the
    n = (size/p)^2 patches of side p stay visible (the official random_mask), the rest are noised."""
    B, n = len(ratio), (size // p) ** 2
    visible = torch.floor(n * (1 - ratio)).long()
    rank = torch.rand(B, n, generator=gen, device=gen.device).argsort(1).argsort(1)   # a random order
    m = (rank < visible[:, None]).float().view(B, 1, size // p, size // p)
    return m.repeat_interleave(p, 2).repeat_interleave(p, 3)


def shuffle_patches(z, p, gen):
    """Every p x p latent patch of the batch moved to a random patch position of a random image
    (one permutation over all B * n patches, as the official shuffle_patches)."""
    B, C, H, W = z.shape
    patches = F.unfold(z, p, stride=p).transpose(1, 2).reshape(-1, C * p * p)   # (B n, C p p)
    patches = patches[torch.randperm(len(patches), generator=gen, device=gen.device).to(z.device)]
    return F.fold(patches.view(B, -1, C * p * p).transpose(1, 2), (H, W), p, stride=p)


def forward_process(z0, t, m, noise, abar):
    """Eq. 7: z_t = z0 on visible patches (m=1), sqrt(abar) z0 + sqrt(1-abar) noise elsewhere.
    Eq. 11, masked as the official code: eta = (1-m) (noise - (1 - sqrt(abar)) / sqrt(1 - abar) z0), 0 where m=1."""
    a = abar[t].view(-1, 1, 1, 1)
    zt = m * z0 + (1 - m) * (a.sqrt() * z0 + (1 - a).sqrt() * noise)
    eta = (1 - m) * (noise - (1 - a.sqrt()) / (1 - a).sqrt() * z0)
    return zt, eta


def corrector_loss(model, batch, gen, cfg, unet=None):
    """Eq. 12 on one batch of cached posteriors: MSE between eta and eta_theta over all positions.
    unet: model.unet compiled for training (--compile); by default model.unet itself."""
    dev, T = model.abar.device, cfg['T']
    mean, std, cls = batch['mean'].to(dev), batch['std'].to(dev), batch['cls'].to(dev)
    B, size = len(mean), mean.shape[-1]
    z0 = mean + std * torch.randn(mean.shape, generator=gen, device=gen.device).to(dev)   # posterior sample
    t = torch.randint(0, T, (B,), generator=gen, device=gen.device).to(dev)
    probs = torch.tensor(cfg['patch_probs'], device=gen.device)
    p = cfg['patch_sizes'][torch.multinomial(probs, 1, generator=gen).item()]
    ratio = torch.rand(B, generator=gen, device=gen.device) * cfg['r_mask']
    m = random_patch_mask(ratio, size, p, gen).to(dev)
    ratio = torch.rand(B, generator=gen, device=gen.device) * cfg['r_shuffle']
    gauss = random_patch_mask(ratio, size, p, gen).to(dev)
    eps = torch.randn(mean.shape, generator=gen, device=gen.device).to(dev)
    noise = gauss * eps + (1 - gauss) * shuffle_patches(z0, p, gen)             # shuffled-patch noise
    zt, eta = forward_process(z0, t, m, noise, model.abar)
    with common.autocast(dev, cfg['dtype']):
        pred = (model.unet if unet is None else unet)(zt, t, cls)   # not `or`: a compiled net has no truth value
    return F.mse_loss(pred.float(), eta)


def autoencoder_loss(model, batch, gen, cfg):
    """Small AE (stage 1): L1 reconstruction of a posterior sample + ae_kl * KL(q(z|x) || N(0, I)),
    both summed per image as in LDM (so ae_kl=1e-6 means what it means there), divided by the
    pixel count for readable logs; one random crop position per batch (cheaper steps)."""
    x = batch['image'].to(model.abar.device) * 2 - 1                          # [-1, 1]
    crop = min(cfg['ae_crop'] or x.shape[-1], x.shape[-1])                   # at most the whole image
    i, j = torch.randint(0, x.shape[-1] - crop + 1, (2,), generator=gen, device=gen.device).tolist()
    x = x[..., i:i + crop, j:j + crop]
    mean, logvar = model.vae.encode(x)
    z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=gen, device=gen.device).to(x.device)
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum((1, 2, 3))
    rec = (model.vae.decode(z) - x).abs().sum((1, 2, 3))
    return (rec + cfg['ae_kl'] * kl).mean() / x[0].numel()

# -----------------------------------------------------------------------------
# the model: frozen autoencoder + eta_theta + schedule; deviation correction and the anomaly map


class Model(nn.Module):
    INFER_KEYS = ('S', 'strategy', 'gamma_p', 'gamma_l', 'sigma_pix', 'sigma_lat', 'sigma_map')
    FINAL_STAGE = 'diffusion'   # common.load refuses 'ae' checkpoints: the corrector is not trained yet
    SCORE_RULE = 'max of the Eq. 15 map: sqrt(clipped pixel discrepancy x clipped latent discrepancy)'

    def __init__(self, cfg):
        super().__init__()
        if min(cfg['gamma_p'], cfg['gamma_l']) <= 0 or min(cfg['sigma_pix'], cfg['sigma_lat'], cfg['sigma_map']) < 0:
            raise common.UserError('--gamma_p and --gamma_l must be > 0 (map thresholds), the --sigma_* >= 0 (blurs)')
        levels = [2 ** i for i in range(len(cfg['ch_mult']))]            # downsample factor of each level
        hd, widths = cfg['head_dim'], [cfg['ch'] * m for m, d in zip(cfg['ch_mult'], levels) if d in cfg['attn_ds']]
        widths.append(cfg['ch'] * cfg['ch_mult'][-1])                   # the middle block's
        for bad, fix in ((cfg['attn_ds'] and not set(cfg['attn_ds']) & set(levels),     # a typo: no attention
                          f"--attn_ds {cfg['attn_ds']} matches none of the U-Net's downsample factors "
                          f'{tuple(levels)}; --attn_ds= builds no attention'),
                         (hd < 1 or any(w < hd or w % (w // hd) for w in widths),      # heads = width // hd
                          f'--head_dim {hd}: each attention width {tuple(widths)} needs at least one head, and '
                          'width // head_dim heads of equal size'),
                         (not 0 <= cfg['dropout'] < 1, f"--dropout must lie in [0, 1) (got {cfg['dropout']})"),
                         (cfg['strategy'] not in ('z_prev', 'z0'), f"--strategy {cfg['strategy']!r}: z_prev or z0")):
            if bad:
                raise common.UserError(fix)
        self.cfg = cfg
        sd = cfg['vae'] == 'sd'
        try:
            self.vae = AutoencoderKL(*((SD_VAE['channels'], SD_VAE['layers']) if sd else
                                       (cfg['ae_channels'], cfg['ae_res_blocks']))).requires_grad_(False)
            self.unet = UNet(cfg)
        except (ValueError, ZeroDivisionError) as e:     # GroupNorm of a width its group count does not divide
            raise common.UserError(f"--ch {cfg['ch']} --ch_mult {cfg['ch_mult']} --ae_channels {cfg['ae_channels']}: "
                                   f'{e} (GroupNorm: every width it normalises, skips concatenated included, must be a '
                                   'multiple of 4, and of 32 from 128 up; multiples of 32 always work)')
        abar = torch.cumprod(1 - cosine_betas(cfg['T']), 0)
        self.register_buffer('abar', abar.float())                               # \bar\alpha_t
        # latent scale: 0.18215 for the SD VAE, 1/std of the training latents for the small AE
        self.register_buffer('scale', torch.tensor(SD_VAE['scale'] if sd else 1.0))

    def encode(self, x):
        """Posterior (mean, std) of scaled latents for images x in [0,1] (the AE sees [-1,1])."""
        parts = [self.vae.encode(c * 2 - 1) for c in x.split(16)]          # 16 images at a time, see decode
        mean, logvar = (torch.cat(p) for p in zip(*parts))
        return mean * self.scale, (0.5 * logvar).exp() * self.scale

    def decode(self, z):
        """Scaled latents -> images in [-1, 1] (not clipped). Both directions run 16 images at a time:
        the SD VAE at 256 px holds ~0.2 GB of activations per image, so the paper's batch of 128
        would need ~30 GB of GPU memory at evaluation."""
        return torch.cat([self.vae.decode(c / self.scale) for c in z.split(16)])

    def correct(self, z, cls):
        """Eq. 13-14 from the clean latent (no noise): over t = t_S > ... > t_1, predict eta, z~0 =
        z - sqrt(1-abar_t) eta, then z = z~0 + sqrt(1-abar_prev) eta (z_prev) or z = z~0 (z0)."""
        ts = respaced(self.cfg['T'], self.cfg['S'])
        for k in reversed(range(len(ts))):
            t = torch.full((len(z),), ts[k], device=z.device, dtype=torch.long)
            with common.autocast(z.device, self.cfg['dtype']):
                eta = self.unet(z, t, cls).float()
            z0 = z - (1 - self.abar[ts[k]]).sqrt() * eta                          # Eq. 13
            if self.cfg['strategy'] == 'z_prev' and k > 0:
                z = z0 + (1 - self.abar[ts[k - 1]]).sqrt() * eta                    # Eq. 14
            else:                                                                   # z0 (Model checks it)
                z = z0
        return z

    def anomaly_map(self, x_rec, x0, z_rec, z0):
        """Eq. 15 with the official reductions: pixel term max over RGB of |x~0 - x0| (images in
        [-1,1]) clipped at gamma_p, latent term mean over channels of |z~0 - z0| clipped at gamma_l,
        each scaled to [0,1] and blurred; the latent term is upsampled bilinearly; geometric mean,
        blurred once more (sigma_map, the paper-era code's final smoothing)."""
        c, size = self.cfg, x0.shape[-1]
        d_pix = (x_rec - x0).abs().amax(1, keepdim=True).clamp(max=c['gamma_p']) / c['gamma_p']
        d_pix = common.gaussian_blur(d_pix, c['sigma_pix'] * size / 256)
        d_lat = (z_rec - z0).abs().mean(1, keepdim=True).clamp(max=c['gamma_l']) / c['gamma_l']
        d_lat = F.interpolate(common.gaussian_blur(d_lat, c['sigma_lat'] * z0.shape[-1] / 32), size=x0.shape[-2:],
                              mode='bilinear', align_corners=False)
        amap = common.gaussian_blur((d_pix * d_lat).sqrt(), c['sigma_map'] * size / 256)
        return amap[:, 0], d_pix[:, 0], d_lat[:, 0]

    @torch.no_grad()
    def predict(self, batch):
        z0, _ = self.encode(batch['image'])                                     # posterior mean
        z_rec = self.correct(z0, batch['cls'])
        x0, x_rec = self.decode(z0), self.decode(z_rec)                         # D(z0), D(z~0)
        amap, d_pix, d_lat = self.anomaly_map(x_rec, x0, z_rec, z0)
        top = lambda a: a.flatten(1).amax(1)
        return dict(map=amap, score=top(amap), recon=((x_rec + 1) / 2).clamp(0, 1),
                    scores=dict(pixel=top(d_pix), latent=top(d_lat)),
                    nfe=dict(unet=self.cfg['S'], vae_encoder=1, vae_decoder=2))

# -----------------------------------------------------------------------------
# training: stage 'ae' (small autoencoder only), then stage 'diffusion' (the corrector)


class LatentSet(torch.utils.data.Dataset):
    """The training set encoded once by the frozen autoencoder: posterior mean and std per image."""

    def __init__(self, mean, std, cls):
        self.mean, self.std, self.cls = mean, std, cls

    def __len__(self):
        return len(self.mean)

    def __getitem__(self, i):
        return dict(mean=self.mean[i], std=self.std[i], cls=int(self.cls[i]))


@torch.no_grad()
def encode_dataset(model, data, cfg):
    """Posterior moments of every training image; sets the small AE's scale to 1/std(latents)."""
    if cfg['vae'] == 'small':
        model.scale.fill_(1.0)
    means, stds = [], []
    for i in range(0, len(data), 64):
        x = (data.images[i:i + 64].float() / 255).to(cfg['device'])
        mean, std = model.encode(x)
        means.append(mean.cpu())
        stds.append(std.cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    if cfg['vae'] == 'small':
        s = 1 / mean.std()
        model.scale.fill_(s.item())
        mean, std = mean * s, std * s
    return LatentSet(mean, std, data.cls)


def lr_at(step, steps, lr, min_lr, warmup):
    """Linear warm-up (lr / warmup at step 0, lr at step warmup - 1), then cosine from lr to min_lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


def fit(model, stage_name, params, loss_fn, data, cfg, run, schedule, transform=None, size_key='batch_size'):
    """One training stage: AdamW with schedule = (steps, lr, min_lr, warmup) for lr_at, batches of
    cfg[size_key], per-step generators, exact resume, logging, periodic checkpoints that record the
    stage. run = dict(ckpt, seconds, t0, path)."""
    rank, _ = common.rank_world()
    steps, lr, min_lr, warmup = schedule
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg['weight_decay'])
    step, ckpt = 0, run['ckpt']
    if ckpt is not None and ckpt['stage'] == stage_name:
        common.load_optimizer(opt, ckpt['opt'])
        step = ckpt['step']
    batches = common.train_batches(data, cfg, step, transform, size_key)
    bar = tqdm(total=steps, initial=step, desc=stage_name, disable=rank != 0, leave=False)
    t_log, step_log, elapsed = time.time(), step, lambda: run['seconds'] + time.time() - run['t0']
    while step < steps:
        for g in opt.param_groups:
            g['lr'] = lr_at(step, steps, lr, min_lr, warmup)
        torch.manual_seed(common.key_seed(cfg['seed'], rank, stage_name, step))   # dropout, if any
        gen = common.generator(cfg['seed'], rank, stage_name, step, device=cfg['device'])
        loss = loss_fn(model, next(batches), gen, cfg)
        common.check_finite(loss, step, run['path'])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        common.all_reduce_grads(params)
        opt.step()
        step += 1
        bar.update()
        if step % cfg['log_interval'] == 0 or step == steps:
            common.print0(f"{stage_name} step {step}/{steps} | loss {loss.item():.4f} | lr "
                          f"{opt.param_groups[0]['lr']:.1e} | {(step - step_log) / (time.time() - t_log):.1f} it/s")
            t_log, step_log = time.time(), step
        if step % cfg['ckpt_interval'] == 0 or step == steps:
            common.save(run['path'], model, opt=opt.state_dict(), step=step, stage=stage_name,
                        final=stage_name == model.FINAL_STAGE and step == steps, train_seconds=elapsed())
    bar.close()


def setup(cfg):
    """Check the config, then build the model (loading the SD VAE if asked) or restore it from the
    checkpoint (--resume). Returns (model, checkpoint or None, training images, checkpoint path)."""
    path, resume = os.path.join(cfg['out_dir'], 'ckpt.pt'), cfg['resume']
    if resume:                                        # the checkpoint's config, see common.resume
        model, ckpt = common.resume(cfg, Model)
        cfg = model.cfg                               # keys of what the run has done: printed, saved, unused
        common.refuse_spent(cfg, ckpt['config'], ('vae_weights',), 'its start (the SD VAE is in the checkpoint)')
        if ckpt['stage'] == 'diffusion':
            common.refuse_spent(cfg, ckpt['config'], AE_KEYS, "the autoencoder's stage")
            common.refuse_spent(cfg, ckpt['config'], ('epochs',), 'the corrector\'s start, which turned --epochs '
                                'into --steps (type --steps)')
    if cfg['vae'] not in ('sd', 'small'):
        raise common.UserError(f"--vae {cfg['vae']!r}: choose sd or small")
    f = 8 if cfg['vae'] == 'sd' else 2 ** max(len(cfg['ae_channels']) - 1, 0)   # downsampling factor
    latent = cfg['image_size'] // f
    if cfg['vae'] == 'small' and (not cfg['ae_channels'] or cfg['ae_res_blocks'] < 1 or cfg['ae_crop'] % f) or (
            cfg['image_size'] % f):
        raise common.UserError(f"--image_size {cfg['image_size']} and --ae_crop {cfg['ae_crop']} must be multiples "
                               f"of the autoencoder's downsampling {f}, with --ae_res_blocks >= 1 and --ae_channels "
                               'one width per level')
    if cfg['vae'] == 'sd' and not cfg['vae_weights'] and not resume:
        raise common.UserError('--vae sd needs --vae_weights: a local copy of stabilityai/sd-vae-ft-ema '
                               '(diffusion_pytorch_model.safetensors), or use --vae small')
    if any(p < 1 or latent % p for p in cfg['patch_sizes']) or len(cfg['patch_sizes']) != len(cfg['patch_probs']) \
            or not cfg['patch_probs'] or min(cfg['patch_probs']) < 0 or sum(cfg['patch_probs']) <= 0:
        raise common.UserError(f"--patch_sizes {cfg['patch_sizes']} must divide the latent size {latent} "
                               'and match --patch_probs (weights >= 0, not all 0) in length')
    respaced(cfg['T'], cfg['S'])
    if cfg['data'] == 'visa' and not resume and 'val_frac' not in cfg.get('cli_keys', ()):
        cfg = dict(cfg, val_frac=0.0)      # the official VisA run trains on all of train/good
    data = common.load_dataset(cfg, 'train')
    if resume:
        return model, ckpt, data, path
    cfg = dict(cfg, n_classes=len(data.categories))
    common.seed_everything(cfg['seed'])                       # same initial weights on every rank
    model = Model(cfg)
    if cfg['vae'] == 'small':
        # start near-deterministic (posterior std e^-3, as a trained KL-f8 AE): Adam moves the
        # log-variance bias by at most ~lr per step, so a short run could not shrink it from 0
        nn.init.constant_(model.vae.quant_conv.bias[4:], -6.0)
    if cfg['vae'] == 'sd':
        model.cfg = cfg = dict(cfg, vae_record=load_vae_weights(model.vae, cfg['vae_weights']))
    return model.to(cfg['device']), None, data, path


def corrector_schedule(cfg, n):
    """(steps, warm-up steps) of the corrector on n training images: as given, else the paper's
    epochs (Sec. 5.1: 800 on MVTec, 200 on VisA; ~20000 steps of 128 on all of MVTec) with the
    official 10-epoch warm-up. Stored in the config, so a resumed run keeps them."""
    per_epoch = n / cfg['batch_size']
    epochs = cfg['epochs'] or (200 if cfg['data'] == 'visa' else 800)
    return cfg['steps'] or math.ceil(epochs * per_epoch), cfg['warmup_steps'] or math.ceil(10 * per_epoch)


def train(cfg):
    model, ckpt, data, path = setup(cfg)
    cfg = model.cfg
    millions = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
    official = OFFICIAL_PARAMS.get(cfg['ch']) if tuple(cfg['ch_mult']) == (1, 2, 4) else None
    kind = 'class-conditioned' if cfg['class_cond'] else 'unconditional'
    ref = f'official class-conditioned UNet of this width: {official} M' if official else 'no official size'
    common.print0(f"unet {millions(model.unet):.2f} M params ({kind}; {ref}) | {cfg['vae']} autoencoder "
                  f"{millions(model.vae):.2f} M params")
    run = dict(ckpt=ckpt, seconds=ckpt['train_seconds'] if ckpt else 0.0, t0=time.time(), path=path)
    if cfg['vae'] == 'small' and (ckpt is None or ckpt['stage'] == 'ae'):
        model.vae.requires_grad_(True).train()
        anomaly = functools.partial(common.perlin_anomaly, p=cfg['ae_anomaly'], dtd_root=cfg['dtd_root'])
        size_key = 'ae_batch_size' if cfg['ae_batch_size'] else 'batch_size'   # 0 = the corrector's
        fit(model, 'ae', list(model.vae.parameters()), autoencoder_loss, data, cfg, run,
            (cfg['ae_steps'], cfg['ae_lr'], 0.0, 50), anomaly, size_key)   # 50 warm-up steps, decay to 0
        model.vae.requires_grad_(False)
    model.vae.eval()
    latents = encode_dataset(model, data, cfg)
    common.print0(f"latents {tuple(latents.mean.shape[1:])} | scale {model.scale.item():.4f} | posterior std / "
                  f"latent std {latents.std.mean().item() / latents.mean.std().item():.3f}")
    cfg['steps'], cfg['warmup_steps'] = corrector_schedule(cfg, len(data))
    model.unet.train()
    unet = torch.compile(model.unet) if cfg['compile'] else model.unet   # training only; shares the weights
    fit(model, 'diffusion', list(model.unet.parameters()), functools.partial(corrector_loss, unet=unet), latents,
        cfg, run, (cfg['steps'], cfg['lr'], cfg['min_lr'], cfg['warmup_steps']))   # the paper's schedule (Sec. 5.1)
    return model.eval(), run['seconds'] + time.time() - run['t0']


def main(argv=None):
    common.run(common.get_config(config, PRESETS, argv, __file__, __doc__), train, Model)


if __name__ == '__main__':
    common.cli(main)
