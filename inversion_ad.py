"""
inversion_ad.py: reconstruction-free anomaly detection by DDIM inversion of frozen backbone features.

Paper: S. Sakai, T. Hasegawa, "Reconstruction-Free Anomaly Detection with Diffusion Models via Direct
Latent Likelihood Evaluation", arXiv 2504.05662 (2025). Official code: SkyShunsuke/InversionAD,
commit 5013ead (the version matching the paper: U-Net, one model per category).

The idea. A diffusion model is trained on the feature maps of a frozen ImageNet backbone of normal
images only (eps prediction, Eq. 9). At test time nothing is reconstructed: the features z0 of a
test image are pushed along the model's deterministic probability-flow ODE to the end of the
diffusion (DDIM inversion, Eq. 14-15), where normal data should look like N(0, I). An anomalous
input lands in a low-density region, so the latent itself is the anomaly score: its negative
log-likelihood under N(0, I), and the spread of its per-position norm (Eq. 17), which is also the
anomaly map. With ImageNet features, two or three network evaluations per image suffice.

Implemented: the forward process (Eq. 7), the eps objective with gamma = 1 (Eq. 9), the DDIM
quantities f_theta (Eq. 11) and step (Eq. 12, sigma = 0), the accelerated inversion (Eq. 15),
the per-position norm map (Eq. 17) and the score of Algorithm 1 in the form of the official code.

Following the official code where it differs from the paper text:
- inversion timesteps: guided-diffusion's space_timesteps(1000, S), i.e. S evenly spaced steps that
  include 0 and 999 (S=2: [0, 999]; S=4: [0, 333, 666, 999]), plus a final step to abar_next = 0,
  so the final latent is eps_theta(x_999, 999) and NFE = S (the paper writes tau_3 = [333, 666, 999]);
- image score = minmax(NLL) + minmax(max - min of the norm map), with NLL = 1/2 sum z^2 + const and
  the non-squared per-position L2 norm of Eq. 17 (Algorithm 1 writes an unsquared ||x||_2 for the
  first term, whose official form is Sec. 4.4's log-likelihood, and squared norms for the map);
  min-max over the evaluated test set of each category (transductive, score_norm='test').
  score_norm='val' uses the min/max of the validation split stored in the checkpoint instead, and
  scores single images;
- the pixel map is the norm map upsampled bilinearly (align_corners=False), no smoothing;
- the U-Net is unconditional (the official code passes class labels under a key the network
  ignores); the raw weights are evaluated, as the official code does; the EMA (0.999) is kept in
  the checkpoint under 'ema';
- learning rate: AdamW (wd 0), linear warm-up 1e-6 -> 5e-5 over 40 epochs, then cosine to 1e-6.
Deviations and assumptions:
- backbone (paper preset, --backbone efficientnet_b4): timm tf_efficientnet_b4 (the TF-ported weights
  of the official lukemelas EfficientNet), stages 1-4 = 24+32+56+160 = 272 channels at strides
  2/4/8/16, each resized bilinearly to one feature_size grid (16 at 256 px, as the paper). timm pads
  its stride-2 convs for the input's size (TF 'SAME'), lukemelas for 380 px: at 256 px stage 3's 5x5
  stride-2 conv pads 1 left/top, 2 right/bottom instead of 2 all round, so the stage 3-4 maps sit one
  stride-4 pixel off the official ones (not reproduced; its effect cannot be measured offline). Pixels are
  ImageNet-normalised (the weights' own normalisation, the official HEAD's); pixel_norm='half' gives
  the v1 code's (x - 0.5) / 0.5. The paper preset loads the weights from the timm cache (an error if
  absent); with --backbone_weights '' the backbone is random with BatchNorm statistics recalibrated
  on the training images (random EfficientNet features vanish otherwise), built from the run's seed
  and saved in the checkpoint;
- backbone of the tiny preset (the offline default), --backbone pixels: no pretrained weights exist
  offline, and random EfficientNet features carry too little of the low-level colour/intensity
  information the synthetic defects need (kNN memory-bank probes, image/pixel AUROC: random B4
  stages 1-4 on an 8x8 grid 69.2/76.0, stages 1-2 on 32x32 75.6/87.0; 4x4 pixel blocks 82.8/92.8).
  So z0 is the image resized to b g, b x b space-to-depth (3 b^2 channels on a g x g grid; the tiny
  preset's b = 2: the 128 px image at 64 px, 12 channels), each channel standardised over the
  positions of its own image (raw pixels vary by only 0.25-0.6 std inside an image, weak against
  unit diffusion noise). The diffusion, inversion and scores are the paper's;
- no checkpoint selection on the test set (the paper reports best-test-AUROC checkpoints, and
  "Ours*" tunes S per class on the test set): the last checkpoint is evaluated;
- training uses train/good minus the validation split (--val_frac 0.1, which score_norm='val' and
  --predict normalise by); the official code trains on all of train/good: --val_frac 0 (no
  validation statistics then, so score_norm='test' only);
- tiny preset (CPU), every value chosen on the validation proxy (val-split normals + 2
  Perlin-anomalous copies each), none on the test set: grid 32 (stride 4 at 128 px) of 2x2 blocks
  (12 channels); U-Net width 32 at all three levels (32/16/8, attention at 8x8), 1 ResBlock per
  level (0.4 M); 96 epochs = 1152 steps at lr 1e-3, batch 48 (what the 10-minute budget allows);
  S = 2, the paper's default (proxy, seeds 0-2: S = 3 97.1 / 94.6, 5 97.0 / 94.0, 10 96.1 / 93.2 against
  95.9 / 95.0: more steps rank images better and maps worse; by the rule set before the check,
  another S had to win on both by a point); one multi-class model. The width must be at least the C
  feature channels: the input enters and eps leaves through 3x3 convolutions of width w (the top
  level), so over a g x g grid the net's eps spans at most w g^2 of the C g^2 dimensions, and at
  large t, where eps ~ x_t, its loss cannot fall below 1 - w/C (4x4 blocks, C = 48: width 32 stalled
  at 0.42, width 64 reached 0.08). The paper-scale net has the same property, mildly (256 channels
  on 272 features, a floor of 6%); the paper preset keeps it. 2x2 blocks need only width 32, whose
  step on batch 48 costs about what width 64's on batch 16 with 4x4 blocks did, so the same budget
  trains on three times the samples; validation proxy, seeds 0-2: 95.9 / 95.0 against 94.2 / 91.7.
  The default run scores 84.1 image / 91.5 pixel mean AUROC (seeds 0-2: 82.9 / 90.6; the README has
  the measurements): the pipeline on pixels at CPU scale, not the paper's setting.

$ python inversion_ad.py                                              # tiny, synthetic, CPU minutes
$ python inversion_ad.py --data mvtec --train --backbone_weights timm # paper preset, per category
$ python eval.py out/inversion_ad_mvtec_each_paper_s0/bottle/ckpt.pt --S 3
$ python eval.py --predict out/<run>/ckpt.pt image.png               # val-normalised score
"""
import copy
import math
import os
import time
import warnings

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
from common import UserError

# -----------------------------------------------------------------------------
# config: the defaults are the paper's (S = 2, its "Ours"; 1000 epochs) and otherwise the official v1
# configs/exp_unet_ad/<class>.yml (pixel_norm: see above)

config = dict(
    common.BASE_CONFIG,
    backbone='efficientnet_b4',  # efficientnet_b4: frozen stages 1-4 (paper) | pixels: standardised space-to-depth
    feature_size=16,        # feature grid g (16 = stride 16 at 256 px, as the paper; pixels: image resized to b g)
    block=4,                # pixels only: side b of the blocks stacked into 3 b^2 channels
    pixel_norm='imagenet',  # imagenet (mean/std of the weights) | half: (x - 0.5) / 0.5 (official v1)
    T=1000,                 # diffusion steps (linear betas 1e-4 .. 0.02)
    ch=256,                 # U-Net base width
    ch_mult=(1, 1, 2, 2),   # width multiplier per resolution level
    num_res_blocks=2,       # residual blocks per level
    attn_ds=(2, 4, 8),      # downsampling factors with self-attention (8x8, 4x4, 2x2 of a 16 grid)
    num_heads=8,            # attention heads
    epochs=1000,            # training epochs over the cached training features
    warmup_epochs=40,       # linear warm-up from init_lr to lr
    lr=5e-5,                # peak learning rate (AdamW)
    init_lr=1e-6,           # learning rate at step 0
    min_lr=1e-6,            # learning rate at the end of the cosine decay
    weight_decay=0.0,       # AdamW weight decay
    grad_clip=1.0,          # gradient norm clip
    ema_decay=0.999,        # EMA of the U-Net weights, saved as ckpt['ema'] (not evaluated)
    S=2,                    # inversion steps = network evaluations per image (2..10; paper "Ours": 2)
    score_norm='test',      # test: min-max over each category's test set (official) | val: stored val stats
)
config.update(batch_size=8, image_size=256)
del config['dtd_root']   # a shared key this method has no use for (no synthetic anomalies)
# keys that older checkpoints and results.json hold under other names (old: new; common.current_names)
RENAMED = dict(channels='ch', channel_mult='ch_mult')
# keys added since: the value a checkpoint saved before them was trained with (common.saved_config)
LEGACY = dict(block=4)
PRESETS = {
    'paper': dict(category='each', backbone_weights='timm'),   # one model per category, ImageNet B4
    'tiny': dict(backbone='pixels', image_size=128, feature_size=32, block=2, ch=32, ch_mult=(1, 1, 1),
                 num_res_blocks=1, attn_ds=(4,), num_heads=4, S=2, batch_size=48, epochs=96, warmup_epochs=6, lr=1e-3,
                 init_lr=1e-5, min_lr=1e-5, log_interval=100, ckpt_interval=500),
}
S_RANGE = range(2, 11)   # the inversion lengths the validation statistics are stored for
EFFICIENTNET = 'tf_efficientnet_b4.aa_in1k'   # timm name of the paper's backbone (TF-ported weights)

# -----------------------------------------------------------------------------
# diffusion schedule, DDIM step and inversion (Eq. 7, 11, 12, 15); the paper's alpha_t is the
# cumulative product, abar here


def linear_abar(T):
    """abar_t = prod_{s<=t} (1 - beta_s), t = 0..T-1, float64; linear betas 1e-4 .. 0.02 at T = 1000
    (DDPM), scaled by 1000 / T otherwise (guided-diffusion's get_named_beta_schedule)."""
    scale = 1000 / T
    return torch.cumprod(1 - torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64), 0)


def inversion_timesteps(S, T=1000):
    """guided-diffusion's space_timesteps(T, str(S)) as the official code uses it: S evenly spaced
    steps including 0 and T-1, with its float accumulation and round() (S=5: [0,250,500,749,999])."""
    if S not in S_RANGE:
        raise UserError(f'--S must be in {S_RANGE[0]}..{S_RANGE[-1]} (got {S})')
    ts, cur = [], 0.0
    for _ in range(S):
        ts.append(round(cur))
        cur += (T - 1) / (S - 1)
    return ts


def f_theta(x, eps, ab):
    """Eq. 11: the x0 predicted from x_t and eps at noise level abar_t."""
    return (x - (1 - ab) ** 0.5 * eps) / ab ** 0.5


def inversion_step(x, eps, ab, ab_next):
    """Eq. 15: x_{tau_i} -> x_{tau_{i+1}}, one Euler step of the PF-ODE (Eq. 13) forwards in time."""
    return ab_next ** 0.5 * f_theta(x, eps, ab) + (1 - ab_next) ** 0.5 * eps


def ddim_step(x, eps, ab, ab_prev):
    """Eq. 12 with sigma = 0: x_{tau_i} -> x_{tau_{i-1}}, the deterministic generative step."""
    return ab_prev ** 0.5 * f_theta(x, eps, ab) + (1 - ab_prev) ** 0.5 * eps


def invert(eps_net, z0, ts, abar, prior_step=True):
    """Push z0 through ts with Eq. 15 as the official ddim_reverse_sample (eta 0, no clipping): each
    step goes to the next listed timestep and, with prior_step, a last one from ts[-1] to
    abar_next = 0, so the latent returned is eps_theta(x_999, 999) and NFE = len(ts). Without it the
    pass stops at x_{ts[-1]} (NFE = len(ts) - 1). eps_net(x, t) -> eps; abar[t] is a float."""
    x = z0
    for i, t in enumerate(ts if prior_step else ts[:-1]):
        ab_next = abar[ts[i + 1]] if i + 1 < len(ts) else 0.0
        x = inversion_step(x, eps_net(x, t), abar[t], ab_next)
    return x


def ddim_sample(eps_net, x, ts, abar):
    """The deterministic generative pass (Eq. 12) from x_{ts[-1]} down to x_{ts[0]}, over the list
    invert() walks up without its final jump to abar = 0. It undoes invert() exactly only when
    eps_theta is the same on both paths (e.g. constant); for a trained net it measures round trips."""
    for t, t_prev in zip(ts[:0:-1], ts[-2::-1]):
        x = ddim_step(x, eps_net(x, t), abar[t], abar[t_prev])
    return x

# -----------------------------------------------------------------------------
# the eps network: a guided-diffusion U-Net (ResBlocks with a time embedding, self-attention at low
# resolution, skip concatenation, zero-initialised output convolutions)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of the original timestep index 0..T-1 (cos half, then sin half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], 1)


def zero(module):
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb_dim):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(32, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        self.out_layers = nn.Sequential(nn.GroupNorm(32, cout), nn.SiLU(), zero(nn.Conv2d(cout, cout, 3, padding=1)))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class Attention(nn.Module):
    """Multi-head self-attention over the positions of a feature map, residual."""

    def __init__(self, ch, heads):
        super().__init__()
        self.heads, self.norm = heads, nn.GroupNorm(32, ch)
        self.qkv, self.proj = nn.Conv1d(ch, 3 * ch, 1), zero(nn.Conv1d(ch, ch, 1))

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x).flatten(2))                                # (B, 3C, HW)
        q, k, v = qkv.reshape(b, 3 * self.heads, c // self.heads, h * w).transpose(2, 3).chunk(3, 1)
        if x.is_cuda:   # fused CUDA kernels need contiguous heads (else: HW x HW scores); CPU as published
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        a = F.scaled_dot_product_attention(q, k, v)                           # (B, heads, HW, C/heads)
        return x + self.proj(a.transpose(2, 3).reshape(b, c, h * w)).reshape(b, c, h, w)


class Up(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode='nearest'))


class UNet(nn.Module):
    """eps_theta(x_t, t) on (B, C, g, g) features, in guided-diffusion's UNetModel layout: per level
    n_res ResBlocks (+ attention where the downsampling factor is in attn_ds) and a strided conv;
    a middle ResBlock-attention-ResBlock; the mirror image upwards on concatenated skips."""

    def __init__(self, c_in, ch, mult, n_res, attn_ds, heads):
        super().__init__()
        emb, self.ch = 4 * ch, ch
        self.time_embed = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))

        def block(cin, cout, ds):
            return [ResBlock(cin, cout, emb)] + ([Attention(cout, heads)] if ds in attn_ds else [])
        self.down, skips, cur, ds = nn.ModuleList([nn.ModuleList([nn.Conv2d(c_in, ch, 3, padding=1)])]), [ch], ch, 1
        for level, m in enumerate(mult):
            for _ in range(n_res):
                self.down.append(nn.ModuleList(block(cur, m * ch, ds)))
                cur = m * ch
                skips.append(cur)
            if level < len(mult) - 1:                                          # downsample by 2
                self.down.append(nn.ModuleList([nn.Conv2d(cur, cur, 3, stride=2, padding=1)]))
                skips.append(cur)
                ds *= 2
        self.middle = nn.ModuleList([ResBlock(cur, cur, emb), Attention(cur, heads), ResBlock(cur, cur, emb)])
        self.up = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for i in range(n_res + 1):
                layers = block(cur + skips.pop(), m * ch, ds)
                cur = m * ch
                if level and i == n_res:                                       # upsample by 2
                    layers.append(Up(cur))
                    ds //= 2
                self.up.append(nn.ModuleList(layers))
        self.out = nn.Sequential(nn.GroupNorm(32, cur), nn.SiLU(), zero(nn.Conv2d(cur, c_in, 3, padding=1)))

    def forward(self, x, t):
        emb = self.time_embed(timestep_embedding(t, self.ch))
        h, hs = x, []
        for block in self.down:
            h = _apply(block, h, emb)
            hs.append(h)
        h = _apply(self.middle, h, emb)
        for block in self.up:
            h = _apply(block, torch.cat([h, hs.pop()], 1), emb)
        return self.out(h)


def _apply(block, h, emb):
    """Run one U-Net block (a list of layers); only the ResBlocks take the time embedding."""
    for layer in block:
        h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
    return h

# -----------------------------------------------------------------------------
# scores of the final latent (Eq. 17 and Algorithm 1, as the official evaluate())


def latent_scores(xT):
    """(NLL under N(0, I), max - min of the norm map, norm map (B,h,w)) of final latents."""
    n = xT.norm(dim=1)                                                         # Eq. 17
    d = xT[0].numel()
    nll = 0.5 * xT.pow(2).flatten(1).sum(1) + 0.5 * d * math.log(2 * math.pi)  # -log N(xT; 0, I)
    return nll, n.flatten(1).amax(1) - n.flatten(1).amin(1), n


def minmax(x, lo, hi):
    """The official normalisation (x - min) / (max - min + 1e-8)."""
    return (x - lo) / (hi - lo + 1e-8)

# -----------------------------------------------------------------------------
# the model: frozen backbone + eps U-Net + schedule + validation statistics


class Pixels(nn.Module):
    """The weight-free 'pixels' backbone: the image resized (antialiased) to bg x bg, every b x b patch
    stacked into channels (space-to-depth): (B, 3, bg, bg) -> (B, 3b^2, g, g), and each channel of each
    image standardised over its g x g positions. Raw pixels vary little inside one image (std 0.25-0.6
    after ImageNet normalisation on the synthetic data), so against unit-variance diffusion noise most
    timesteps would carry almost no signal; standardised, the features have unit variance, as
    diffusion schedules assume. Per image, so a score never depends on other images. No parameters."""

    def __init__(self, g, b):
        super().__init__()
        self.g, self.b = g, b

    def forward(self, x):
        x = F.interpolate(x, size=(self.b * self.g,) * 2, mode='bilinear', antialias=True, align_corners=False)
        z = F.pixel_unshuffle(x, self.b)
        return (z - z.mean((2, 3), keepdim=True)) / (z.std((2, 3), keepdim=True) + 1e-3)


class Model(nn.Module):
    INFER_KEYS = ('S', 'score_norm')
    SCORE_RULE = ('minmax(NLL of x_T) + minmax(max - min of the per-position norm of x_T); '
                  'min-max over the test set of each category (score_norm=test) or the stored '
                  'validation split (score_norm=val)')

    def __init__(self, cfg):
        super().__init__()
        self.cfg, ds = cfg, [2 ** i for i in range(len(cfg['ch_mult']))]   # factor of each level
        widths = [cfg['ch'] * m for m, f in zip(cfg['ch_mult'], ds) if f in cfg['attn_ds']]   # with attention,
        widths.append(cfg['ch'] * cfg['ch_mult'][-1])                                       # the middle's too
        for bad, fix in ((cfg['feature_size'] < 1 or cfg['feature_size'] % ds[-1],
                          f'--feature_size must be a positive multiple of {ds[-1]}'),
                         (cfg['T'] <= 20, f"--T must be above 20: the betas 1e-4..0.02 are scaled by 1000 / T "
                          f"(got {cfg['T']})"),
                         (cfg['ch'] % 32, f"--ch must be a multiple of 32 (GroupNorm; got {cfg['ch']})"),
                         (cfg['num_heads'] < 1 or any(w % cfg['num_heads'] for w in widths),   # (middle's included)
                          f"--num_heads {cfg['num_heads']} must divide each attention width {tuple(widths)}"),
                         (not set(cfg['attn_ds']) <= set(ds), f'--attn_ds must be among {ds}'),
                         (cfg['pixel_norm'] not in ('imagenet', 'half'), '--pixel_norm must be imagenet or half'),
                         (cfg['block'] < 1, '--block must be at least 1'),
                         (cfg['score_norm'] not in ('test', 'val'), '--score_norm must be test or val')):
            if bad:
                raise UserError(fix)
        if cfg['backbone'] == 'pixels':
            self.backbone, c = Pixels(cfg['feature_size'], cfg['block']), 3 * cfg['block'] ** 2
        elif cfg['backbone'] == 'efficientnet_b4':
            # frozen backbone; random weights here, pretrained or BN-recalibrated ones are set by train()
            self.backbone = timm.create_model(EFFICIENTNET, pretrained=False, features_only=True,
                                              out_indices=(0, 1, 2, 3)).eval().requires_grad_(False)
            # stage 4 ends at block 4; timm would still run the stride-32 blocks 5-6 (13.1 of 16.7 M
            # parameters, 1.4 of 3.8 GFLOPs at 256 px) and discard them
            self.backbone.blocks = self.backbone.blocks[:5]
            c = sum(self.backbone.feature_info.channels())                    # 24 + 32 + 56 + 160 = 272
        else:
            raise UserError(f"--backbone must be efficientnet_b4 or pixels (got {cfg['backbone']!r})")
        width = cfg['ch'] * cfg['ch_mult'][0]           # every path to the output runs through the top level
        if width < c:
            warnings.warn(f"the U-Net's full-resolution width {width} is below the {c} feature channels: its noise "
                          f'prediction cannot span every feature direction (a loss floor of 1 - {width}/{c}; the paper '
                          "preset's 256 on 272, the official code's, is 6%); raise --ch")
        self.unet = UNet(c, cfg['ch'], cfg['ch_mult'], cfg['num_res_blocks'], cfg['attn_ds'],
                         cfg['num_heads'])
        self.register_buffer('abar', linear_abar(cfg['T']).float(), persistent=False)
        # min/max of (NLL, spatial) on the validation split for each S: rows S=2..10; NaN until the
        # end of training (calibrate), so a checkpoint saved mid-run cannot score as if calibrated
        self.register_buffer('val_stats', torch.full((len(S_RANGE), 4), float('nan')))

    def train(self, mode=True):   # the backbone stays in eval mode (frozen BatchNorm statistics)
        super().train(mode)
        self.backbone.eval()
        return self

    def normalise(self, image):
        if self.cfg['pixel_norm'] == 'half':
            return (image - 0.5) / 0.5
        mean = torch.tensor([0.485, 0.456, 0.406], device=image.device).view(1, 3, 1, 1)
        return (image - mean) / torch.tensor([0.229, 0.224, 0.225], device=image.device).view(1, 3, 1, 1)

    @torch.no_grad()
    def features(self, image):
        """z0 = g_phi(x), (B, c, g, g): the four EfficientNet stages resized to the grid and
        concatenated (c = 272), or the standardised pixels in b x b space-to-depth (c = 3 b^2)."""
        g = self.cfg['feature_size']
        fs = self.backbone(self.normalise(image))
        if self.cfg['backbone'] == 'pixels':
            return fs
        return torch.cat([F.interpolate(f.float(), size=(g, g), mode='bilinear', align_corners=False)
                          for f in fs], 1)

    def eps(self, x, t):
        """eps_theta(x, t) for one integer timestep, in float32 (bf16 only inside the U-Net)."""
        with common.autocast(x.device, self.cfg['dtype']):
            out = self.unet(x, torch.full((len(x),), t, device=x.device, dtype=torch.long))
        return out.float()

    @torch.no_grad()
    def invert(self, z0, S):
        """The final latent x_T of features z0 after S inversion steps (Eq. 15)."""
        abar = self.abar.tolist()
        return invert(self.eps, z0, inversion_timesteps(S, self.cfg['T']), abar)

    @torch.no_grad()
    def calibrate(self, z_val):
        """Store min/max of NLL and spatial score over the validation features for every S."""
        if len(z_val) < 5:      # one image gives max = min: val-normalised scores of ~1e8
            common.print0(f'warning: the validation split has {len(z_val)} image(s), too few for the min/max '
                          'that --score_norm val and --predict normalise by; raise --val_frac or add images')
        for row, S in enumerate(S_RANGE):
            nll, sp = map(torch.cat, zip(*[latent_scores(self.invert(z.to(self.abar.device), S))[:2]
                                           for z in z_val.split(64)]))
            self.val_stats[row] = torch.stack([nll.min(), nll.max(), sp.min(), sp.max()])

    @torch.no_grad()
    def predict(self, batch):
        S = self.cfg['S']
        xT = self.invert(self.features(batch['image']), S)
        nll, sp, n = latent_scores(xT)
        lo_n, hi_n, lo_s, hi_s = self.val_stats[S - S_RANGE[0]]     # NaN before calibrate()
        score = minmax(nll, lo_n, hi_n) + minmax(sp, lo_s, hi_s)   # val-normalised; postprocess may redo it
        amap = F.interpolate(n[:, None], size=batch['image'].shape[-2:], mode='bilinear', align_corners=False)
        return dict(map=amap[:, 0], score=score, scores=dict(nll=nll, spatial=sp), nfe={'backbone': 1, 'unet': S})

    def postprocess(self, outs):
        """score_norm='test': min-max NLL and spatial score over this test set (official evaluate())."""
        if self.cfg['score_norm'] == 'test':
            nll, sp = outs['scores']['nll'], outs['scores']['spatial']
            outs['score'] = minmax(nll, nll.min(), nll.max()) + minmax(sp, sp.min(), sp.max())
        elif self.val_stats.isnan().any():
            raise UserError('--score_norm val: this checkpoint has no validation statistics (saved before training '
                            'ended: finish it with --resume; or trained with --val_frac 0); use --score_norm test')
        return outs

# -----------------------------------------------------------------------------
# training


def lr_at(step, total, warmup, cfg):
    """Linear warm-up init_lr -> lr, then cosine lr -> min_lr (official WarmupCosineAnnealingScheduler)."""
    if step < warmup:
        return cfg['init_lr'] + (cfg['lr'] - cfg['init_lr']) * step / warmup
    p = (step - warmup) / max(total - warmup, 1)
    return cfg['min_lr'] + 0.5 * (cfg['lr'] - cfg['min_lr']) * (1 + math.cos(math.pi * p))


@torch.no_grad()
def cache_features(model, dataset, batch_size=32):
    """Features of every image of a split, computed once (the backbone is frozen), kept on the CPU."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    return torch.cat([model.features(b['image'].to(model.abar.device)).cpu() for b in loader])


def prepare_backbone(model, train_set, cfg):
    """Pretrained weights (recorded by id and sha256), or BatchNorm statistics of the training images;
    the weight-free pixels backbone needs neither. The record is kept in cfg (so in the checkpoint)."""
    if cfg['backbone'] == 'pixels':
        if cfg['backbone_weights']:
            raise UserError('--backbone pixels (the tiny preset\'s) has no weights: add --backbone efficientnet_b4 '
                            'to use --backbone_weights, or drop it')
        b = cfg['block']
        record = dict(id='pixels', file=f'weight-free {b}x{b} space-to-depth, per-image standardised', sha256='')
    elif cfg['backbone_weights']:
        record = common.load_pretrained(model.backbone, EFFICIENTNET, cfg['backbone_weights'])
    else:
        # recalibrate_bn averages per-batch statistics: shuffled batches mix the categories, so
        # each batch (and the average) matches the statistics of the whole training set
        order = torch.randperm(len(train_set), generator=common.generator(cfg['seed'], 'bn'))
        loader = torch.utils.data.DataLoader(train_set.subset(order), batch_size=64)
        common.recalibrate_bn(model.backbone, (model.normalise(b['image'].to(cfg['device'])) for b in loader))
        record = dict(id=EFFICIENTNET, file='random init + BatchNorm recalibration', sha256='', seed=cfg['seed'])
    model.cfg['backbone_record'] = record
    common.print0(f"backbone {record['id']}: {record['file']} {record['sha256'][:12]}")


def build(cfg, train_set):
    """A fresh model built from the run's seed (every rank builds the same one), backbone prepared."""
    common.seed_everything(cfg['seed'])
    model = Model(cfg).to(cfg['device'])
    prepare_backbone(model, train_set, cfg)
    n = sum(p.numel() for p in model.unet.parameters())
    common.print0(f"U-Net {n / 1e6:.1f} M parameters | backbone "
                  f"{sum(p.numel() for p in model.backbone.parameters()) / 1e6:.1f} M (frozen)")
    return model


def check_config(cfg):
    inversion_timesteps(cfg['S'], cfg['T'])                                    # fail early on a bad --S
    if cfg['warmup_epochs'] >= cfg['epochs']:                                 # ... and a warm-up that never ends
        raise UserError(f"--warmup_epochs {cfg['warmup_epochs']} must be fewer than --epochs {cfg['epochs']}")


def optimizer_and_ema(model, ckpt):
    """AdamW on the U-Net and its EMA copy, both as the checkpoint left them when resuming."""
    cfg = model.cfg
    opt = torch.optim.AdamW(model.unet.parameters(), lr=cfg['init_lr'], weight_decay=cfg['weight_decay'])
    ema = copy.deepcopy(model.unet).requires_grad_(False)
    if 'opt' in ckpt:
        common.load_optimizer(opt, ckpt['opt'])
        ema.load_state_dict(ckpt['ema'])
    return opt, ema


def train(cfg):
    """Train eps_theta on cached features with Eq. 9 (gamma = 1); returns (model, train_seconds)."""
    cfg, (rank, _), resume, t0 = dict(cfg), common.rank_world(), cfg['resume'], time.time()
    check_config(cfg)
    ckpt_path = os.path.join(cfg['out_dir'], 'ckpt.pt')
    if resume:                                   # the run keeps the checkpoint's config (common.resume)
        model, ckpt = common.resume(cfg, Model)
        cfg = model.cfg
    train_set = common.load_dataset(cfg, 'train')           # val: the statistics of score_norm='val'
    val_set = common.load_dataset(cfg, 'val') if cfg['val_frac'] else None  # (--val_frac 0: all of train/good)
    if not resume:                               # build() keeps cfg as model.cfg and completes it
        model, ckpt = build(cfg, train_set), dict(step=0, train_seconds=0.0)
    per_epoch = math.ceil(len(train_set) / cfg['batch_size'])
    total, warmup = cfg['epochs'] * per_epoch, cfg['warmup_epochs'] * per_epoch
    step, seconds = ckpt['step'], ckpt['train_seconds']
    if ckpt.get('final') and step >= total:        # a finished run resumed: nothing to train or re-save
        return model.eval(), seconds
    model.val_stats.fill_(float('nan'))             # a finished run trained further: its statistics are stale
    z_train = cache_features(model, train_set)                    # (N, c, g, g), c = 272 or 3 b^2; once
    common.print0(f'features {tuple(z_train.shape[1:])}, std {z_train.std():.3f}, {len(z_train)} training images')
    opt, ema = optimizer_and_ema(model, ckpt)
    net = torch.compile(model.unet) if cfg['compile'] else model.unet
    batches = common.train_batches(torch.utils.data.TensorDataset(z_train), cfg, step)
    model.unet.train()
    t_log, bar = time.time(), tqdm(total=total, initial=step, disable=rank != 0, leave=False)
    while step < total:
        loss = train_step(model, net, opt, ema, next(batches)[0].to(cfg['device']), step, total, warmup, ckpt_path)
        step += 1
        bar.update(1)
        if step % cfg['log_interval'] == 0 and rank == 0:
            tqdm.write(f"step {step}/{total} | loss {loss:.4f} | lr {opt.param_groups[0]['lr']:.1e} | "
                       f"{cfg['log_interval'] / (time.time() - t_log):.1f} it/s")
            t_log = time.time()
        if step % cfg['ckpt_interval'] == 0 and step < total:
            common.save(ckpt_path, model, opt=opt.state_dict(), ema=ema.state_dict(), step=step, final=False,
                        train_seconds=seconds + time.time() - t0)
    bar.close()
    if val_set is not None:
        model.eval().calibrate(cache_features(model, val_set))                # score_norm='val' statistics
    seconds += time.time() - t0
    common.save(ckpt_path, model, opt=opt.state_dict(), ema=ema.state_dict(), step=step, final=True,
                train_seconds=seconds)
    return model, seconds


def train_step(model, net, opt, ema, z0, step, total, warmup, ckpt_path):
    """One step of Eq. 9: t ~ U{0..T-1}, x_t by Eq. 7, ||eps_theta(x_t, t) - eps||^2, gamma = 1."""
    cfg = model.cfg
    g = common.generator(cfg['seed'], common.rank_world()[0], step, device=z0.device)   # this step's draws
    t = torch.randint(0, cfg['T'], (len(z0),), generator=g, device=g.device).to(z0.device)
    eps = torch.randn(z0.shape, generator=g, device=g.device).to(z0.device)
    ab = model.abar[t].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * z0 + (1 - ab).sqrt() * eps                              # Eq. 7
    with common.autocast(z0.device, cfg['dtype']):
        pred = net(x_t, t)
    loss = F.mse_loss(pred.float(), eps)                                      # Eq. 9
    common.check_finite(loss, step, ckpt_path)
    for group in opt.param_groups:
        group['lr'] = lr_at(step, total, warmup, cfg)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    common.all_reduce_grads(model.unet.parameters())
    nn.utils.clip_grad_norm_(model.unet.parameters(), cfg['grad_clip'])
    opt.step()
    with torch.no_grad():
        for p_ema, p in zip(ema.parameters(), model.unet.parameters()):
            p_ema.lerp_(p, 1 - cfg['ema_decay'])
    return loss.item()


def main(argv=None):
    common.run(common.get_config(config, PRESETS, argv, __file__, __doc__), train, Model)


if __name__ == '__main__':
    common.cli(main)
