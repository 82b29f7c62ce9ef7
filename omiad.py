"""
OmiAD: One-Step Adaptive Masked Diffusion Model for Multi-class Anomaly Detection via Adversarial
Distillation (Feng, Chen, Li, Chen, Wang, Zhao, Liu, Zhou; ICML 2025). Minimal re-implementation.

The idea. A frozen EfficientNet-B4 turns an image into a 272-channel feature map x0. Stage 1 trains
AMDM, a DDPM in that feature space whose inputs are randomly masked with a probability that grows
with the noise level (the adaptive mask), so the denoiser must fill in features from their context
instead of copying them (the "identical shortcut" that lets reconstructions reproduce anomalies).
Stage 2 (ASD) compresses the multi-step AMDM teacher into a one-step generator g: x0 noised at
t_init -> clean x0_hat, trained with Score identity Distillation (SiD) against the frozen teacher
plus a small Diffusion-GAN loss whose discriminator is the encoder of the student score network.
At test time a single generator call reconstructs the features of a normal-looking version of the
image; the anomaly map is the squared feature difference ||x0 - x0_hat||^2 (Algorithm 2).

Implemented: Eq. 2 (q_sample), Eq. 6-11 (AMDM: adaptive mask, masked noising, x0 loss), Eq. 12
(one-step generator), Eq. 13 + Eq. 17 (student score + discriminator loss), Eq. 15/27 with Eq. 16
(SiD generator loss) + Eq. 18 (adversarial generator loss), Algorithm 1 (alternating ASD updates,
theta <- phi, psi <- phi, D = encoder(psi)) and Algorithm 2 (one-step inference). The teacher alone
(DDIM from t_init, --use_teacher --teacher_steps K) is kept for the teacher-vs-student comparison.

No official code exists (the repo holds only a README). Choices where the paper is silent:
  * Features: timm tf_efficientnet_b4 stages 1-4 (out_indices 0-3: 24+32+56+160 channels, strides
    2-16), ImageNet pixel normalisation, each map resized bilinearly to feature_size (antialiased, so
    the stride-2/4 maps are averaged rather than subsampled when shrunk) and concatenated; raw
    features by default (as UniAD, whose pipeline the authors name; feat_norm=True standardises
    channels). The paper preset loads the weights from the timm cache (an error if absent); with
    --backbone_weights '': random init + BatchNorm recalibration on a random (category-mixed)
    subset of training images, saved in the checkpoint.
  * Mask (Eq. 6-8): p(t) is the probability to MASK (drop) a position, M = 1 - Bernoulli(p(t));
    one draw per spatial position shared by all channels (mask='spatial'), since an element mask
    leaves the other channels of a position visible. 'element' is available.
  * gamma(t) of Eq. 11 = min(SNR_t, snr_max), snr_max = 5 (Min-SNR): gamma = 1 (a plain x0 loss)
    weights the eps error at t ~ 1000 by 1/SNR ~ 2e4, gamma = SNR (an eps loss) explodes on masked
    positions at small t; the cap sits between them.
  * Teacher training: Adam lr 1e-3, batch 32 (paper), constant; gradient-norm clip 1 and an EMA
    teacher (assumed). Stage lengths are not given: 100k AMDM and 20k ASD steps (assumed).
  * U-Net: guided-diffusion style (ResBlocks, GroupNorm, self-attention at low resolution, zero-
    initialised output); mult (1,1,2,2), 2 blocks/level, attention at 8x8 and 4x4, 8 heads, as
    InversionAD on the same features (OmiAD gives none), but ch 288, not 256: every path to the
    output runs through the ch-wide top level, so a narrower net cannot predict the noise in every
    feature direction, and in those it misses Eq. 10 leaves sqrt((1 - abar)/abar) eps of pure noise
    in x0_hat (~107 eps at t_init = 960). 288 is the narrowest GroupNorm-compatible width >= 272
    (152 M parameters); Model warns below the feature channels.
  * ASD follows SiD/SiDA's code: lr 1e-5, Adam betas (0, 0.999), psi-only warm-up, adversarial
    term in the generator loss only after adv_start steps, logits clamped to +-10, psi gradients
    clipped by value 1. gamma(t) of Eq. 27 = (sigma_t^2/abar_t) / wf with wf the per-sample mean
    |x_g - x0_hat_phi| (SiD's normaliser) makes Eq. 27 SiD's x0-space loss. Algorithm 1 line 13
    writes (eps_phi - eps_psi)(eps_psi - eps_t), which differs from Eq. 15/27 by a -||Delta||^2
    term: we use Eq. 15/27 (= SiD's code). Eq. 18 as printed (mean D) would push D(x_t) down; we
    use SiDA's non-saturating -log D(x_t), divided by wf as SiDA does. The lambdas of Algorithm 1
    (garbled in the PDF) are read as lambda_psi^adv = 1 and lambda_theta^adv = 0.01 on per-element
    means, and the discriminator loss is -Eq. 17 / 2 (SiDA's 1/2); as the score and SiD losses are
    means too, not the paper's squared-norm sums, both adversarial terms weigh more against them
    (up to C x S^2 times) than the same lambdas would there. Alg. 1 line 9's gamma(t) on the score
    loss is taken as 1. t ~ U{0..t_max} in both updates (Algorithm 1; SiDA draws sigma log-normally
    in the psi update). One data batch per iteration serves both updates (x_g computed once, line
    4). The generator is used as trained (SiDA also keeps an EMA of it). Its reconstruction error on
    the validation split is checked against the teacher's one-step error (= the generator before
    ASD) before every checkpoint; above drift_max x, training stops. Gradients are averaged with
    common.all_reduce_grads, not a DDP wrapper (which fits neither the alternating updates nor the
    encoder-only discriminator pass), and --compile compiles the stage-1 teacher only.
  * Inference: per-sample noise seeded by the image path; map = squared L2 over channels, upsampled
    bilinearly to the input size, not blurred; image score = max of a 16x16 (at 224 px, scaled with
    the input size) average-pooled map, as UniAD and HVQ-Trans (same group) score images. t_init =
    960 with ImageNet EfficientNet features (paper; 400 with ResNet): it depends on the feature
    scale. eval.py --t_init is meant for the teacher (--use_teacher): the generator was distilled
    at one t_init, and t_init must stay within amdm_t_max.

Tiny preset (CPU, within 10 min; every value chosen on a validation proxy, the normal validation images
plus two Perlin-anomalous copies of each, never on the test set; the README has the measurements):
  * DEVIATION, backbone='pixels', weight-free: the ImageNet-normalised image resized (antialiased)
    to 4 feature_size, every 4x4 block stacked into one 48-channel vector (pixel_unshuffle; --block
    b: b x b blocks, 3b^2 channels). Offline there are no pretrained weights, and random
    EfficientNet features lose the colour/intensity cues the synthetic defects need: a kNN memory
    bank (an upper bound for any scorer) reaches 69.2 / 76.0 image / pixel AUROC on random B4
    stages 1-4 and 82.8 / 92.8 on these pixels. 2x2 blocks train a better teacher in the same time,
    but their student lost on the proxy.
  * 128 px, a 32x32 grid, a 3-level U-Net 64/64/128 wide (3.3 M; at least the 48 pixel channels, as
    above), batch 8, 1200 AMDM steps with EMA 0.99, 100 ASD steps with SiDA's ordering scaled down
    (psi-only for 50 steps, adversarial term from step 75; at this scale it does not move the
    student), the drift monitor on 64 validation images.
  * DEVIATION: the teacher is trained, and ASD draws t, on 0..299 only (amdm_t_max, t_max): the
    generator starts at t_init = 100 and ASD queries t <= 299, so every step used was trained on,
    and the 1200 steps put 3.3x the samples there (the budget caps the teacher's quality at t_init).
    The paper preset trains on every t, as the paper's DDPM does (its t_init = 960 needs them).
  * DEVIATION: t_init = 100 (abar = 0.90), for these features.
  * DEVIATION: ASD lr 2.5e-6, not 1e-5. Adam with beta1 = 0 moves every weight by ~lr from the first
    step while the SiD gradient starts at zero, and 100 steps cannot pay that back: at 1e-5 the
    generator's validation error ended at ~1.25x the teacher's, at 2.5e-6 at 1.06-1.08x.
  * Default run: 78.0 / 85.6 image / pixel AUROC (seeds 0-2: 79.9 / 86.3; the one-step teacher of
    the same run 78.4 / 85.9), 4.6 min on 2 cores of an Intel Xeon, 10 min on an AVX2-only EPYC.

$ python omiad.py                                           # tiny preset, synthetic data, CPU minutes
$ python omiad.py --data mvtec --backbone_weights timm --train   # paper preset, all 15 classes
$ python eval.py out/omiad_synthetic_all_tiny_s0/ckpt.pt --use_teacher --teacher_steps 10
$ torchrun --standalone --nproc_per_node=8 omiad.py --data visa --backbone_weights timm --train
"""
import copy
import math
import os
import time
import warnings

import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common

# -----------------------------------------------------------------------------
# config: defaults are the paper's settings; PRESETS['tiny'] is the CPU-minutes version

config = dict(
    common.BASE_CONFIG,
    batch_size=32,          # global batch, both stages (paper: 32)
    image_size=224,         # backbone input (paper: 224)
    # features
    backbone='efficientnet_b4',  # efficientnet_b4 (paper: frozen stages 1-4, 272 ch) | pixels (3 b^2 ch, no weights)
    feature_size=32,        # feature grid: every stage map (or pixel block) -> S x S, S = feature_size (paper: 32)
    block=4,                # pixels only: side b of the blocks stacked into 3 b^2 channels
    bn_images=256,          # training images used for BatchNorm recalibration of a random backbone
    cache_features=True,    # extract training features once (MVTec at 32x32: 4 GB); False: per batch
    feat_norm=False,        # standardise each channel with training-set mean/std (paper: raw features)
    # diffusion (Eq. 1-2): DDPM, linear betas
    T=1000,                 # diffusion steps
    beta_1=1e-4,            # first beta of the linear schedule
    beta_T=0.02,            # last beta of the linear schedule
    # U-Net (eps-prediction; teacher, generator and student score share the architecture)
    ch=288,                 # base width (>= the 272 feature channels: see Model; InversionAD's is 256)
    ch_mult=(1, 1, 2, 2),   # width multiplier per resolution level
    num_res_blocks=2,       # ResBlocks per level on the down path
    attn_res=(8, 4),        # feature resolutions with self-attention
    num_heads=8,            # attention heads
    # stage 1: AMDM teacher (Eq. 6-11)
    amdm_steps=100000,      # teacher training steps (not in the paper; assumed)
    amdm_lr=1e-3,           # Adam learning rate (paper)
    amdm_t_max=999,         # teacher trained on t ~ U{0..amdm_t_max} (paper: all T steps)
    grad_clip=1.0,          # gradient-norm clip of the teacher (assumed)
    ema_decay=0.999,        # EMA of the teacher weights; the EMA is the teacher (assumed)
    p_min=0.1,              # Eq. 7 mask probability at t = 0
    p_max=0.4,              # Eq. 7 mask probability at t = T
    kappa=2.0,              # Eq. 7 growth exponent
    mask='spatial',         # spatial (one draw per position, all channels) | element
    snr_max=5.0,            # gamma(t) of Eq. 11 = min(SNR_t, snr_max) (Min-SNR; assumed)
    # stage 2: ASD (Algorithm 1)
    asd_steps=20000,        # distillation steps (assumed)
    asd_lr=1e-5,            # Adam lr of generator and student score (SiD; 1e-4 drifted in tests)
    t_init=960,             # generator input noise level, the one it is distilled at (paper: 960, EfficientNet)
    t_max=990,              # t ~ U{0..t_max} in both updates (Algorithm 1)
    alpha=1.0,              # Eq. 15/27 weight of the -||Delta||^2 term (paper: 1)
    lambda_d=1.0,           # lambda_psi^adv: discriminator loss weight in the psi update
    lambda_adv=0.01,        # lambda_theta^adv: adversarial loss weight in the generator update
    psi_warmup=3000,        # first steps update psi only (SiDA: 100k images)
    adv_start=6000,         # step from which the generator gets the adversarial term (SiDA: 200k images)
    logit_clamp=10.0,       # discriminator logits clamped to +-logit_clamp in the generator loss (SiDA)
    psi_clip=1.0,           # gradient value clip of psi (SiDA)
    drift_max=2.0,          # stop ASD if the generator's val error exceeds drift_max x the teacher's
    val_images=256,         # validation images used for the drift monitor
    # inference (Algorithm 2)
    use_teacher=False,      # score with the multi-step AMDM teacher instead of the one-step generator
    teacher_steps=10,       # DDIM steps of the teacher from t_init
    score_kernel=16,        # image score = max of an avg-pooled map, kernel at 224 px (UniAD)
)
del config['dtd_root']   # a shared key this method has no use for (no synthetic anomalies)
# keys that older checkpoints and results.json hold under other names (old: new; common.current_names)
RENAMED = dict(feat_size='feature_size', heads='num_heads', backbone_source='backbone_record')
# keys added since: the value a checkpoint saved before them was trained with (common.saved_config)
LEGACY = dict(amdm_t_max=999)
STAGE1_KEYS = tuple('amdm_steps amdm_lr amdm_t_max grad_clip ema_decay p_min p_max kappa mask snr_max'.split())
PRESETS = {
    'paper': dict(backbone_weights='timm'),                      # ImageNet B4 (timm cache)
    # CPU minutes on 128 px synthetic images: weight-free pixel features on a 32x32 grid, a 3-level
    # U-Net, t_init and asd_lr chosen on validation Perlin proxies, teacher and ASD on t <= 299 (docstring)
    'tiny': dict(batch_size=8, image_size=128, backbone='pixels', feature_size=32, ch=64,
                 ch_mult=(1, 1, 2), num_res_blocks=1, attn_res=(8,), num_heads=4, amdm_steps=1200, ema_decay=0.99,
                 amdm_t_max=299, asd_steps=100, asd_lr=2.5e-6, t_init=100, t_max=299, psi_warmup=50, adv_start=75,
                 val_images=64, log_interval=50, ckpt_interval=250),
}
BACKBONE = 'tf_efficientnet_b4.aa_in1k'     # timm weights id (TF-ported, as UniAD's lukemelas B4)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# -----------------------------------------------------------------------------
# U-Net (guided-diffusion style). encode() = input conv + down path: SiDA's encoder, whose last
# activation, averaged over channels, is the shared-weight discriminator's logit map (Sec. 3.3.2).


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of integer timesteps t (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], 1)


def zero_init(module):
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb_dim):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(32, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        self.out_layers = nn.Sequential(nn.GroupNorm(32, cout), nn.SiLU(),
                                        zero_init(nn.Conv2d(cout, cout, 3, padding=1)))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb(emb)[:, :, None, None]   # time conditioning
        return self.skip(x) + self.out_layers(h)


class Attention(nn.Module):
    def __init__(self, ch, heads):
        super().__init__()
        self.heads, self.norm = heads, nn.GroupNorm(32, ch)
        self.qkv, self.proj = nn.Conv2d(ch, 3 * ch, 1), zero_init(nn.Conv2d(ch, ch, 1))

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)                  # (B, heads, HW, C/heads)
        if x.is_cuda:   # fused CUDA kernels need contiguous heads (else: HW x HW scores); CPU as published
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class Level(nn.Sequential):
    """Layers applied in order; ResBlocks also receive the time embedding."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class UNet(nn.Module):
    """eps_theta(x_t, t) on (B, C, S, S) features; forward(..., logits=True) also returns the
    discriminator logits (B, S', S') = channel mean of the last encoder activation."""

    def __init__(self, cfg, in_ch):
        super().__init__()
        ch, mult, emb, res = cfg['ch'], cfg['ch_mult'], 4 * cfg['ch'], cfg['feature_size']
        self.ch = ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.inp = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down, skips, c = nn.ModuleList(), [ch], ch
        for i, m in enumerate(mult):
            for _ in range(cfg['num_res_blocks']):
                attn = [Attention(m * ch, cfg['num_heads'])] if res in cfg['attn_res'] else []
                self.down.append(Level(ResBlock(c, m * ch, emb), *attn))
                c = m * ch
                skips.append(c)
            if i < len(mult) - 1:                                   # strided-conv downsampling
                self.down.append(Level(nn.Conv2d(c, c, 3, stride=2, padding=1)))
                skips.append(c)
                res //= 2
        self.mid = Level(ResBlock(c, c, emb), Attention(c, cfg['num_heads']), ResBlock(c, c, emb))
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(mult))):
            for j in range(cfg['num_res_blocks'] + 1):
                layers = [ResBlock(c + skips.pop(), m * ch, emb)]
                c = m * ch
                layers += [Attention(c, cfg['num_heads'])] if res in cfg['attn_res'] else []
                if i > 0 and j == cfg['num_res_blocks']:            # nearest upsampling + conv
                    layers += [nn.Upsample(scale_factor=2, mode='nearest'), nn.Conv2d(c, c, 3, padding=1)]
                    res *= 2
                self.up.append(Level(*layers))
        self.out = nn.Sequential(nn.GroupNorm(32, c), nn.SiLU(), zero_init(nn.Conv2d(c, in_ch, 3, padding=1)))

    def encode(self, x, t):
        """Input conv + down path: the skip activations hs (hs[-1] = encoder output) and emb."""
        emb = self.time_mlp(timestep_embedding(t, self.ch))
        hs = [self.inp(x)]
        for level in self.down:
            hs.append(level(hs[-1], emb))
        return hs, emb

    def decode(self, hs, emb):
        h = self.mid(hs[-1], emb)
        for level in self.up:
            h = level(torch.cat([h, hs.pop()], 1), emb)
        return self.out(h)

    def disc(self, x, t):
        """Discriminator logits only (the decoder is skipped): (B, S', S')."""
        return self.encode(x, t)[0][-1].mean(1)

    def forward(self, x, t, logits=False):
        hs, emb = self.encode(x, t)
        d = hs[-1].mean(1)                          # channel mean of the encoder output (Sec. 3.3.2)
        eps = self.decode(hs, emb)
        return (eps, d) if logits else eps

# -----------------------------------------------------------------------------
# schedule and the small formulas of the paper


def expand(v):
    """(B,) -> (B, 1, 1, 1) for broadcasting over feature maps."""
    return v[:, None, None, None]


def q_sample(x0, t, eps, abar):
    """Eq. 2 / Eq. 9: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
    a = expand(abar[t])
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def predict_x0(x_t, t, eps, abar):
    """Eq. 10: x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), in float32: at t = 960 the
    division multiplies any error of eps by sqrt((1 - abar)/abar) ~ 107, so the conversion must add
    none. It cannot undo the rounding eps arrives with: under --dtype bfloat16 Model warns; TF32
    (allowed on CUDA, ~9x finer) is turned off by NVIDIA_TF32_OVERRIDE=0 (README: measurements)."""
    a = expand(abar[t])
    return (x_t.float() - (1 - a).sqrt() * eps.float()) / a.sqrt()


def mask_prob(t, cfg):
    """Eq. 7: p(t) = p_min + (p_max - p_min) (t / T)^kappa, the probability to mask a position. t runs
    0..T-1 here, as everywhere in this file (abar[0] = 1 - beta_1), so p peaks a hair below p_max."""
    return cfg['p_min'] + (cfg['p_max'] - cfg['p_min']) * (t.float() / cfg['T']) ** cfg['kappa']


def adaptive_mask(shape, t, cfg, gen):
    """Eq. 8 with p(t) read as the masking probability (the paper prints M ~ Bernoulli(p)):
    M(t) = 1 - Bernoulli(p(t)) (1 keeps, 0 masks), one draw per spatial position shared by
    all channels ('spatial') or one per element ('element'). Drawn on gen's device."""
    B, C, H, W = shape
    u = torch.rand((B, 1 if cfg['mask'] == 'spatial' else C, H, W), generator=gen, device=gen.device)
    return (u >= expand(mask_prob(t, cfg))).float().expand(shape)


def sid_loss(eps_phi, eps_psi, eps, t, abar, alpha):
    """Eq. 27 (= Eq. 15 with Eq. 16): gamma(t) * [Delta . (eps - eps_phi) - alpha ||Delta||^2] with
    Delta = eps_psi - eps_phi, averaged over elements and samples; returns (loss, wf). With
    sigma_t = sqrt(1 - abar_t), gamma(t) = (sigma_t^2 / abar_t) / wf, wf = per-sample mean
    |x_g - x0_hat_phi| (detached; it also scales the adversarial term), makes this SiD's x0-space
    loss (x_r - x_f).((x_r - x_g) - alpha (x_r - x_f)) / wf exactly (x_r, x_f = teacher/student x0)."""
    a = expand(abar[t])
    k = ((1 - a) / a).sqrt()                                      # sigma_t / sqrt(abar_t)
    x_err = k * (eps - eps_phi)                                   # x0_hat_phi - x_g (Eq. 10)
    wf = x_err.abs().mean((1, 2, 3), keepdim=True).clamp_min(1e-5).detach()
    gamma = k ** 2 / wf                                           # gamma(t) of Eq. 27
    delta = eps_psi - eps_phi                                     # Eq. 16
    return (gamma * (delta * (eps - eps_phi) - alpha * delta ** 2)).mean(), wf


def bce(logits, target):
    """Per-sample binary cross-entropy of a logit map (B, S', S') against a constant target: (B,)."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target),
                                              reduction='none').flatten(1).mean(1)

# -----------------------------------------------------------------------------
# the model: frozen backbone, AMDM teacher eps_phi, one-step generator g_theta


class Pixels(nn.Module):
    """The weight-free 'pixels' backbone of the tiny preset: the image resized (antialiased) to
    bS x bS and every b x b block stacked into one 3b^2-channel vector (space-to-depth), (B, 3, bS, bS)
    -> (B, 3b^2, S, S). No parameters; a module so that it is a network pass like the EfficientNet."""

    def __init__(self, S, b):
        super().__init__()
        self.S, self.b = S, b

    def forward(self, x):
        x = F.interpolate(x, size=(self.b * self.S,) * 2, mode='bilinear', antialias=True, align_corners=False)
        return F.pixel_unshuffle(x, self.b)


class Model(nn.Module):
    """Frozen backbone -> x0; teacher eps_phi (AMDM, stage 1); generator g_theta (ASD, stage 2);
    predict() = Algorithm 2. The student score psi lives only inside train_asd."""
    INFER_KEYS = ('use_teacher', 'teacher_steps', 'score_kernel', 't_init')
    FINAL_STAGE = 2         # common.load refuses stage-1 checkpoints: the generator is not distilled yet
    SCORE_RULE = 'max of the avg-pooled (16 px at 224) map; map = sum_c (x0 - x0_hat)^2 upsampled'

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        steps_ok = not cfg['use_teacher'] or 1 <= cfg['teacher_steps'] <= max(cfg['t_init'], 1)   # DDIM from t_init
        if not 0 <= cfg['t_init'] <= cfg['amdm_t_max'] or not steps_ok:
            raise common.UserError(f"--t_init must lie in 0..{cfg['amdm_t_max']} (the teacher's training range, "
                                   f"amdm_t_max) and --teacher_steps in 1..t_init (got {cfg['t_init']} and "
                                   f"{cfg['teacher_steps']})")
        if cfg['backbone'] == 'pixels':
            self.backbone, C = Pixels(cfg['feature_size'], cfg['block']), 3 * cfg['block'] ** 2   # 48 at b = 4
        else:                                                         # built here, weights set by train()
            self.backbone = timm.create_model(BACKBONE.split('.')[0], pretrained=False, features_only=True,
                                              out_indices=(0, 1, 2, 3)).eval().requires_grad_(False)
            self.backbone.blocks = self.backbone.blocks[:5]           # stage 4 ends at block 4: timm
            # would still run the stride-32 blocks 5-6 (13.1 of 16.7 M parameters) and discard them
            C = sum(self.backbone.feature_info.channels())            # 24 + 32 + 56 + 160 = 272
        width = cfg['ch'] * cfg['ch_mult'][0]                        # of the top level, the output's input
        if width < C:
            warnings.warn(f"the U-Net's full-resolution width {width} is below the {C} "
                          'feature channels: its noise prediction cannot span every feature direction, and in '
                          'the ones it misses x0_hat keeps sqrt((1 - abar)/abar) eps of pure noise (Eq. 10), '
                          'which lands in every anomaly map; raise --ch')
        self.teacher = UNet(cfg, C).requires_grad_(False)          # eps_phi (AMDM)
        self.generator = UNet(cfg, C).requires_grad_(False)        # g_theta (initialised from phi)
        betas = torch.linspace(cfg['beta_1'], cfg['beta_T'], cfg['T'], dtype=torch.float64)
        self.register_buffer('abar', torch.cumprod(1 - betas, 0).float())   # \bar\alpha_t, t = 0..T-1
        k = ((1 - self.abar[cfg['t_init']]) / self.abar[cfg['t_init']]).sqrt().item()
        if cfg['dtype'] == 'bfloat16' and k >= 10:   # predict_x0: float32 there cannot undo it
            warnings.warn(f"--dtype bfloat16 at t_init {cfg['t_init']}: the network's eps carries bfloat16 rounding, "
                          f'which Eq. 10 multiplies by sqrt((1 - abar)/abar) = {k:.0f} and every anomaly map '
                          'inherits; evaluate in float32')
        self.register_buffer('pixel_mean', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer('pixel_std', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.register_buffer('feat_mean', torch.zeros(1, C, 1, 1))   # set by train() if feat_norm
        self.register_buffer('feat_std', torch.ones(1, C, 1, 1))

    def train(self, mode=True):
        super().train(mode)
        self.backbone.eval()                    # frozen: BatchNorm statistics never change
        return self

    @torch.no_grad()
    def features(self, image):
        """x0 (B, C, S, S), S = feature_size: stage 1-4 maps of the frozen backbone, each resized to S and
        concatenated (C = 272); or the 3b^2-channel space-to-depth blocks of Pixels (48 at b = 4)."""
        x = (image - self.pixel_mean) / self.pixel_std
        if isinstance(self.backbone, Pixels):
            x0 = self.backbone(x)                                      # (B, 3b^2, S, S)
        else:
            s = self.cfg['feature_size']
            x0 = torch.cat([F.interpolate(m.float(), size=(s, s), mode='bilinear', antialias=True)
                            for m in self.backbone(x)], 1)             # (B, 272, S, S)
        return (x0 - self.feat_mean) / self.feat_std               # identity unless feat_norm

    def generate(self, net, x0, eps, t_init):
        """Eq. 12: x_g = g_theta(sqrt(abar) x0 + sqrt(1 - abar) eps) at t_init, one network call: an
        eps-network (net: the generator, initialised from phi, or the teacher) read as x0 by Eq. 10."""
        t = torch.full((len(x0),), t_init, device=x0.device, dtype=torch.long)
        x_t = q_sample(x0, t, eps, self.abar)
        with common.autocast(x0.device, self.cfg['dtype']):
            e = net(x_t, t)
        return predict_x0(x_t, t, e, self.abar)

    def ddim(self, x0, eps):
        """The AMDM teacher alone: deterministic DDIM (eta = 0) from x0 noised at t_init through
        teacher_steps evenly spaced timesteps; NFE = teacher_steps (1: one Eq. 10 step of the teacher,
        which is what the generator is before ASD)."""
        K, t_init = self.cfg['teacher_steps'], self.cfg['t_init']
        ts = [round(t_init * (K - i) / K) for i in range(K)]          # t_init, ..., t_init / K
        t = torch.full((len(x0),), ts[0], device=x0.device, dtype=torch.long)
        x = q_sample(x0, t, eps, self.abar)
        for i, s in enumerate(ts):
            t = torch.full_like(t, s)
            with common.autocast(x0.device, self.cfg['dtype']):
                e = self.teacher(x, t).float()
            x0_hat = predict_x0(x, t, e, self.abar)
            if i + 1 < K:                            # DDIM (eta = 0): re-noise x0_hat with the predicted eps
                x = q_sample(x0_hat, torch.full_like(t, ts[i + 1]), e, self.abar)
        return x0_hat

    @torch.no_grad()
    def predict(self, batch):
        """Algorithm 2: features, noise at t_init (per-sample seeded), one generator step, map."""
        image, cfg = batch['image'], self.cfg
        x0 = self.features(image)
        eps = common.sample_noise(x0.shape[1:], cfg['seed'], batch['path'], x0.device)
        if cfg['use_teacher']:
            x0_hat, nfe = self.ddim(x0, eps), cfg['teacher_steps']
        else:
            x0_hat, nfe = self.generate(self.generator, x0, eps, cfg['t_init']), 1
        err = ((x0 - x0_hat) ** 2).sum(1, keepdim=True)              # Alg. 2 line 8: the paper's S, (B, 1, S, S)
        amap = F.interpolate(err, size=image.shape[-2:], mode='bilinear', align_corners=False)
        k = min(image.shape[-1], max(1, round(cfg['score_kernel'] * image.shape[-1] / 224)))   # (<= the map)
        score = F.avg_pool2d(amap, k, stride=1).flatten(1).amax(1)    # UniAD's image score
        return dict(map=amap[:, 0], score=score, nfe={'unet': nfe})

# -----------------------------------------------------------------------------
# training: stage 1 (AMDM), stage 2 (ASD); exact resume across both


def amdm_loss(model, x0, gen, net=None):
    """Eq. 6-11: mask x0 adaptively, noise it at the same t, reconstruct the UNMASKED x0 (net: the
    teacher, or a compiled wrapper of it)."""
    cfg, abar, B = model.cfg, model.abar, len(x0)
    t = torch.randint(0, cfg['amdm_t_max'] + 1, (B,), generator=gen, device=gen.device)
    keep = adaptive_mask(x0.shape, t, cfg, gen)                      # Eq. 8
    eps = torch.randn(x0.shape, generator=gen, device=gen.device)
    t, keep, eps = t.to(x0.device), keep.to(x0.device), eps.to(x0.device)
    x_m = x0 * keep                                                  # Eq. 6, M(t) = keep
    x_t = q_sample(x_m, t, eps, abar)                                # Eq. 9 (the paper's x_m^t)
    with common.autocast(x0.device, cfg['dtype']):
        e = (model.teacher if net is None else net)(x_t, t)     # not `or`: a compiled net has no truth value
    x0_hat = predict_x0(x_t, t, e, abar)                             # Eq. 10
    gamma = (abar[t] / (1 - abar[t])).clamp(max=cfg['snr_max'])    # min(SNR_t, snr_max)
    return (expand(gamma) * (x0_hat - x0) ** 2).mean()               # Eq. 11


@torch.no_grad()
def extract(model, dataset):
    """x0 of every image of a dataset, on the CPU (the backbone is frozen: computed once)."""
    return torch.cat([model.features(b['image'].to(model.cfg['device'])).cpu()
                      for b in torch.utils.data.DataLoader(dataset, batch_size=64)])


def feature_batches(model, dataset, x0, cfg, start):
    """Endless training batches of x0 from step start on (a pure function of (seed, step)): from
    the cached features x0, or (x0=None) computed batch by batch by the frozen backbone."""
    if x0 is None:
        for b in common.train_batches(dataset, cfg, start):
            yield model.features(b['image'].to(cfg['device']))
    else:
        for (x,) in common.train_batches(torch.utils.data.TensorDataset(x0), cfg, start):
            yield x.to(cfg['device'])


def setup_backbone(model, cfg, dataset):
    """ImageNet weights (weights id + sha256 kept in the config), or random init + BatchNorm
    recalibration on normal training images (the offline default; saved in the checkpoint)."""
    if cfg['backbone'] == 'pixels':
        b = cfg['block']
        cfg['backbone_record'] = dict(id=f'pixels ({b}x{b} space-to-depth, no weights)', file='', sha256='')
        return
    if cfg['backbone_weights']:
        cfg['backbone_record'] = common.load_pretrained(model.backbone, BACKBONE, cfg['backbone_weights'])
        return
    # a seeded random subset, so every batch mixes categories: BatchNorm averages per-batch
    # variances, and single-category batches would miss the between-category variance
    idx = torch.randperm(len(dataset), generator=common.generator(cfg['seed'], 'bn'))[:cfg['bn_images']]
    x = (dataset.images[idx].float() / 255).to(cfg['device'])
    common.recalibrate_bn(model.backbone, [(b - model.pixel_mean) / model.pixel_std for b in x.split(32)])
    cfg['backbone_record'] = dict(id=f'random init (seed {cfg["seed"]}) + BatchNorm recalibrated on '
                                     f'{len(idx)} training images', file='', sha256='')


def training_features(model, data, cfg, fresh):
    """The cached training features x0 (None if cache_features is off). A fresh feat_norm run
    first sets the per-channel mean/std buffers from them (saved in the checkpoint)."""
    if not (cfg['cache_features'] or (fresh and cfg['feat_norm'])):
        return None
    x0 = extract(model, data)
    if fresh and cfg['feat_norm']:
        mu, sd = x0.mean((0, 2, 3), keepdim=True), x0.std((0, 2, 3), keepdim=True)
        model.feat_mean.copy_(mu)
        model.feat_std.copy_(sd)
        x0 = (x0 - mu) / sd
    return x0 if cfg['cache_features'] else None


def train_amdm(model, cfg, data, x0, state, clock):
    """Stage 1. Ends by making the EMA the teacher and initialising the generator from it."""
    ckpt_path, rank = os.path.join(cfg['out_dir'], 'ckpt.pt'), common.rank_world()[0]
    net = model.teacher.requires_grad_(True)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=cfg['amdm_lr'])
    step = 0
    if state:
        ema.load_state_dict(state['ema'])
        common.load_optimizer(opt, state['opt'])
        step = state['step']
    batches, tic = feature_batches(model, data, x0, cfg, step), time.time()
    fwd = torch.compile(net) if cfg['compile'] else net     # stage 1 only: stage 2 alternates three nets
    for step in tqdm(range(step, cfg['amdm_steps']), 'AMDM', disable=rank > 0, initial=step,
                     total=cfg['amdm_steps'], leave=False):
        gen = common.generator(cfg['seed'], rank, 'amdm', step, device=cfg['device'])
        loss = amdm_loss(model, next(batches), gen, fwd)
        common.check_finite(loss, step, ckpt_path)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        common.all_reduce_grads(net.parameters())
        nn.utils.clip_grad_norm_(net.parameters(), cfg['grad_clip'])
        opt.step()
        with torch.no_grad():                                        # EMA teacher
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - cfg['ema_decay'])
        if (step + 1) % cfg['log_interval'] == 0:
            common.print0(f"amdm step {step + 1}/{cfg['amdm_steps']} | loss {loss.item():.4f} | "
                          f"lr {cfg['amdm_lr']:.1e} | {cfg['log_interval'] / (time.time() - tic):.1f} it/s")
            tic = time.time()
        if (step + 1) % cfg['ckpt_interval'] == 0 and step + 1 < cfg['amdm_steps']:
            common.save(ckpt_path, model, stage=1, step=step + 1, final=False, opt=opt.state_dict(),
                        ema=ema.state_dict(), train_seconds=clock())
    model.teacher.load_state_dict(ema.state_dict())                  # phi = the EMA teacher
    model.teacher.requires_grad_(False)
    model.generator.load_state_dict(ema.state_dict())                # Alg. 1 line 2: theta <- phi


@torch.no_grad()
def val_error(model, x0_val, eps_val, net=None):
    """Mean reconstruction error S of one generator step on normal validation features x0_val,
    with their fixed per-image noise eps_val (CPU tensors); net=None uses the generator."""
    cfg, err = model.cfg, 0.0
    for x0, eps in zip(x0_val.split(64), eps_val.split(64)):
        x0, eps = x0.to(cfg['device']), eps.to(cfg['device'])
        x0_hat = model.generate(model.generator if net is None else net, x0, eps, cfg['t_init'])
        err += ((x0 - x0_hat) ** 2).sum(1).mean((1, 2)).sum().item()
    return err / len(x0_val)


def psi_update(model, psi, opt, x0, x_g, gen, cfg):
    """Alg. 1 lines 5-9 up to the step (asd_step takes it after check_finite): student score on
    generator samples (Eq. 13) + discriminator (Eq. 17)."""
    abar, dev = model.abar, x0.device
    t = torch.randint(0, cfg['t_max'] + 1, (len(x0),), generator=gen, device=gen.device).to(dev)
    eps = torch.randn(x0.shape, generator=gen, device=gen.device).to(dev)
    x_t, y_t = q_sample(x_g, t, eps, abar), q_sample(x0, t, eps, abar)   # the same noise (line 5)
    with common.autocast(dev, cfg['dtype']):
        eps_psi, d_fake = psi(x_t, t, logits=True)
        d_real = psi.disc(y_t, t)                                      # encoder only
    loss_score = F.mse_loss(eps_psi.float(), eps)        # Eq. 13; Alg. 1 line 9's gamma(t) taken as 1
    loss_d = 0.5 * (bce(d_real.float(), 1.0) + bce(d_fake.float(), 0.0)).mean()   # -Eq. 17 / 2 (SiDA)
    loss = loss_score + cfg['lambda_d'] * loss_d
    opt.zero_grad(set_to_none=True)
    loss.backward()
    common.all_reduce_grads(psi.parameters())
    for p in psi.parameters():                                         # SiDA: nan_to_num + clip
        torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
    nn.utils.clip_grad_value_(psi.parameters(), cfg['psi_clip'])
    return loss, loss_score.detach(), loss_d.detach()


def generator_loss(model, psi, x_g, gen, cfg, use_adv):
    """Alg. 1 lines 11-13 with Eq. 15/27 (SiD) + the non-saturating form of Eq. 18."""
    abar, dev = model.abar, x_g.device
    t = torch.randint(0, cfg['t_max'] + 1, (len(x_g),), generator=gen, device=gen.device).to(dev)
    eps = torch.randn(x_g.shape, generator=gen, device=gen.device).to(dev)
    x_t = q_sample(x_g, t, eps, abar)
    with common.autocast(dev, cfg['dtype']):
        eps_phi = model.teacher(x_t, t).float()
        eps_psi, d_fake = psi(x_t, t, logits=True)
    l_sid, wf = sid_loss(eps_phi, eps_psi.float(), eps, t, abar, cfg['alpha'])
    l_adv = torch.zeros((), device=dev)
    if use_adv:                         # Eq. 18 non-saturating: -log D(x_t), per sample / wf (SiDA)
        logits = d_fake.float().clamp(-cfg['logit_clamp'], cfg['logit_clamp'])
        l_adv = (bce(logits, 1.0) / wf.flatten()).mean()
    return l_sid + cfg['lambda_adv'] * l_adv, l_sid.detach(), l_adv.detach()


def generator_update(model, g, psi, opt_g, x_g, gen, cfg, use_adv):
    """Alg. 1 lines 11-15 up to the step: psi is frozen and only passes gradients to x_g."""
    psi.requires_grad_(False)
    loss, l_sid, l_adv = generator_loss(model, psi, x_g, gen, cfg, use_adv)
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    common.all_reduce_grads(g.parameters())
    psi.requires_grad_(True)
    return loss, l_sid, l_adv


def check_drift(model, x0_val, eps_val, ref, step):
    """Generator / teacher validation error (averaged over ranks, so all ranks decide alike);
    stops training above drift_max, before the drifted weights reach the checkpoint."""
    cfg = model.cfg
    r = torch.tensor(val_error(model, x0_val, eps_val) / ref, device=cfg['device'])
    if dist.is_initialized():
        dist.all_reduce(r)
        r /= dist.get_world_size()
    if r.item() > cfg['drift_max']:
        raise common.UserError(f"the generator drifted: its validation error is {r.item():.2f}x the teacher's at "
                               f"ASD step {step} (> drift_max {cfg['drift_max']}). The last checkpoint in "
                               f"{cfg['out_dir']} is kept: continue it with a lower lr (--resume --asd_lr "
                               f"{cfg['asd_lr'] / 2:g}), or score its teacher with eval.py CKPT --use_teacher")
    return r.item()


def save_asd(model, step, psi, opt_g, opt_psi, seconds):
    common.save(os.path.join(model.cfg['out_dir'], 'ckpt.pt'), model, stage=2, step=step,
                final=step == model.cfg['asd_steps'], psi=psi.state_dict(), opt_g=opt_g.state_dict(),
                opt_psi=opt_psi.state_dict(), train_seconds=seconds)


def asd_step(model, g, psi, opt_g, opt_psi, x0, gen, step):
    """One iteration of Algorithm 1: a psi update on generator samples, then (after the psi-only
    warm-up) a generator update; returns the logged losses."""
    cfg, ckpt_path = model.cfg, os.path.join(model.cfg['out_dir'], 'ckpt.pt')
    update_g = step >= cfg['psi_warmup']                          # psi-only warm-up (SiDA)
    eps = torch.randn(x0.shape, generator=gen, device=gen.device).to(x0.device)
    with torch.set_grad_enabled(update_g):
        x_g = model.generate(g, x0, eps, cfg['t_init'])           # Alg. 1 line 4 (Eq. 12)
    loss_psi, l_score, l_d = psi_update(model, psi, opt_psi, x0, x_g.detach(), gen, cfg)
    common.check_finite(loss_psi, step, ckpt_path)
    opt_psi.step()
    l_sid = l_adv = torch.zeros(())
    if update_g:
        use_adv = step >= cfg['adv_start']                        # late adversarial term (SiDA)
        loss_g, l_sid, l_adv = generator_update(model, g, psi, opt_g, x_g, gen, cfg, use_adv)
        common.check_finite(loss_g, step, ckpt_path)
        opt_g.step()
    return l_score, l_d, l_sid, l_adv


def train_asd(model, cfg, data, val, x0_train, state, clock):
    """Stage 2 (Algorithm 1): alternate psi and generator updates; the teacher stays frozen."""
    rank = common.rank_world()[0]
    g = model.generator.requires_grad_(True)                      # theta <- phi: done when stage 1 ended
    psi = copy.deepcopy(model.teacher).requires_grad_(True)       # Alg. 1 line 2: psi <- phi; D = encoder(psi)
    opt_g = torch.optim.Adam(g.parameters(), lr=cfg['asd_lr'], betas=(0.0, 0.999))    # SiD
    opt_psi = torch.optim.Adam(psi.parameters(), lr=cfg['asd_lr'], betas=(0.0, 0.999))
    val = val.subset(torch.linspace(0, len(val) - 1, min(cfg['val_images'], len(val))).long())
    x0_val = extract(model, val)
    eps_val = common.sample_noise(x0_val.shape[1:], cfg['seed'], val.paths)   # drawn once, reused per check
    ref, step = val_error(model, x0_val, eps_val, model.teacher), 0    # teacher one-step error
    if state:
        psi.load_state_dict(state['psi'])
        common.load_optimizer(opt_g, state['opt_g'])
        common.load_optimizer(opt_psi, state['opt_psi'])
        step = state['step']
    else:                  # step 0 (generator = teacher, one step): evaluable, and what a drift stop keeps
        save_asd(model, 0, psi, opt_g, opt_psi, clock())
    batches = feature_batches(model, data, x0_train, cfg, cfg['amdm_steps'] + step)   # stage 1's stream, continued
    tic, last = time.time(), step
    for step in tqdm(range(step, cfg['asd_steps']), 'ASD', disable=rank > 0, initial=step,
                     total=cfg['asd_steps'], leave=False):
        gen = common.generator(cfg['seed'], rank, 'asd', step, device=cfg['device'])
        l_score, l_d, l_sid, l_adv = asd_step(model, g, psi, opt_g, opt_psi, next(batches), gen, step)
        save = (step + 1) % cfg['ckpt_interval'] == 0 or step + 1 == cfg['asd_steps']
        if (step + 1) % cfg['log_interval'] == 0 or save:
            drift = check_drift(model, x0_val, eps_val, ref, step + 1)     # before every save
            common.print0(f"asd step {step + 1}/{cfg['asd_steps']} | psi {l_score.item():.4f} | D {l_d.item():.3f} | "
                          f"sid {l_sid.item():.2e} | adv {l_adv.item():.3f} | val err x{drift:.3f} teacher | "
                          f"lr {cfg['asd_lr']:.1e} | {(step + 1 - last) / (time.time() - tic):.2f} it/s")
            tic, last = time.time(), step + 1
        if save:
            save_asd(model, step + 1, psi, opt_g, opt_psi, clock())
    g.requires_grad_(False)


def check_config(cfg):
    if cfg['backbone'] not in ('efficientnet_b4', 'pixels'):
        raise common.UserError(f"--backbone must be efficientnet_b4 or pixels, not {cfg['backbone']!r}")
    if cfg['backbone'] == 'pixels' and cfg['backbone_weights']:
        raise common.UserError("--backbone pixels (the tiny preset's) has no weights: add --backbone "
                               'efficientnet_b4 to use --backbone_weights, or drop it')
    if cfg['block'] < 1:
        raise common.UserError(f"--block must be at least 1, not {cfg['block']}")
    if cfg['mask'] not in ('spatial', 'element'):
        raise common.UserError(f"--mask must be spatial or element, not {cfg['mask']!r}")
    if not 0 <= cfg['t_max'] <= cfg['amdm_t_max'] < cfg['T']:
        raise common.UserError(f"need 0 <= --t_max <= --amdm_t_max <= {cfg['T'] - 1}: the teacher is "
                               f"queried up to t_max and trained up to amdm_t_max")
    if cfg['ch'] % 32 or cfg['feature_size'] < 1 or cfg['feature_size'] % 2 ** (len(cfg['ch_mult']) - 1):
        raise common.UserError(f"--ch must be a multiple of 32 (GroupNorm) and --feature_size a positive multiple "
                               f"of {2 ** (len(cfg['ch_mult']) - 1)} (one halving per U-Net level)")
    levels = [cfg['feature_size'] >> i for i in range(len(cfg['ch_mult']))]
    widths = [cfg['ch'] * m for m, r in zip(cfg['ch_mult'], levels) if r in cfg['attn_res']]   # with attention,
    widths.append(cfg['ch'] * cfg['ch_mult'][-1])                                          # the middle's too
    for bad, fix in ((cfg['attn_res'] and not set(cfg['attn_res']) & set(levels),      # a typo: no attention
                      f"--attn_res {cfg['attn_res']} matches none of the U-Net's resolutions {tuple(levels)}; "
                      '--attn_res= builds no attention'),
                     (cfg['num_heads'] < 1 or any(w % cfg['num_heads'] for w in widths),
                      f"--num_heads {cfg['num_heads']} must divide each attention width {tuple(widths)}"),
                     (not 0 <= cfg['beta_1'] <= cfg['beta_T'] < 1, 'need 0 <= --beta_1 <= --beta_T < 1'),
                     (not 0 <= cfg['p_min'] <= cfg['p_max'] <= 1 or cfg['kappa'] < 0,     # kappa 0: p = p_max
                      'Eq. 7 needs 0 <= --p_min <= --p_max <= 1 and --kappa >= 0'),
                     (not 0 <= cfg['ema_decay'] < 1, '--ema_decay must lie in [0, 1)'),
                     (min(cfg['val_images'], cfg['bn_images']) < 1, '--val_images and --bn_images must be at least 1')):
        if bad:
            raise common.UserError(fix)


def train(cfg):
    """Stage 1 (AMDM teacher) then stage 2 (ASD); returns (model in eval mode, train seconds)."""
    common.seed_everything(cfg['seed'])    # the same backbone and U-Net init on every rank
    if not cfg['resume']:
        check_config(cfg)                   # before building (a resumed run's own values: below)
    model, state = common.resume(cfg, Model) if cfg['resume'] else (Model(dict(cfg)).to(cfg['device']), None)
    cfg = model.cfg                         # the checkpoint's, when resuming (common.resume)
    if state:                               # its own values; keys of what it has done: printed, saved, unused
        check_config(cfg)
        common.refuse_spent(cfg, state['config'], ('bn_images', 'feat_norm'), 'its start')
        common.refuse_spent(cfg, state['config'], STAGE1_KEYS if state['stage'] == 2 else (), 'stage 1 (AMDM)')
    key = state and ('amdm_steps' if state['stage'] == 1 else 'asd_steps')    # a stage cannot be shortened
    if state and state['step'] > cfg[key]:                                     # below what it has trained
        raise common.UserError(f"--{key} {cfg[key]} is below the {state['step']} steps that stage {state['stage']} "
                               f"of {cfg['out_dir']} has trained: give at least {state['step']}")
    data, val = common.load_dataset(cfg, 'train'), common.load_dataset(cfg, 'val')   # val: stage 2's drift check
    if state is None:
        setup_backbone(model, cfg, data)
    n = {k: sum(p.numel() for p in getattr(model, k).parameters()) / 1e6 for k in ('backbone', 'teacher', 'generator')}
    common.print0(f"parameters: backbone {n['backbone']:.2f} M (frozen, {cfg['backbone_record']['id']}), teacher "
                  f"{n['teacher']:.2f} M, generator {n['generator']:.2f} M (+ psi, as large, while distilling)")
    seconds, t0 = state['train_seconds'] if state else 0.0, time.time()
    x0 = training_features(model, data, cfg, fresh=state is None)
    clock = lambda: seconds + time.time() - t0                        # noqa: E731
    if state is None or state['stage'] == 1:
        train_amdm(model, cfg, data, x0, state, clock)
        state = None
    train_asd(model, cfg, data, val, x0, state, clock)
    return model.eval(), clock()


def main(argv=None):
    common.run(common.get_config(config, PRESETS, argv, __file__, __doc__), train, Model)


if __name__ == '__main__':
    common.cli(main)
