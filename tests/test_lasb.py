"""Tests of lasb.py: the I2SB closed forms against their derivations, the sampler with an oracle
network, the VQ straight-through gradient and codebook restarts, and the training/inference contract
(save/load in a fresh process, batch-size invariance, exact resume across both stages)."""
import copy
import functools
import math
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import lasb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a micro model on one synthetic category at 32 px (latents 8x8x3); seconds per training run
MICRO = ('--category weave --image_size 32 --ae_ch 8 --n_embed 32 --vq_restart 2 --ch 8 --ch_mult 1,2 '
         '--attn_res 4 --num_heads 2 --backbone resnet18 --ae_batch_size 4 --batch_size 4 --nfe 4 '
         '--ckpt_interval 2 --log_interval 2').split()


def micro_cfg(out_dir, *extra):
    argv = MICRO + ['--out_dir', str(out_dir)] + list(extra)
    return common.get_config(lasb.config, lasb.PRESETS, argv, lasb.__file__)


def paper_bridge():
    return lasb.Bridge(dict(T=1000, beta_min=0.1, beta_max=0.3))


def test_schedule_symmetry_and_endpoints():
    s = lasb.bridge_schedule(1000, 0.1, 0.3)                      # float64, as I2SB computes it
    assert np.array_equal(s['betas'], s['betas'][::-1])           # small at both ends
    assert s['betas'][0] == pytest.approx(1e-4) and s['betas'].max() < 0.3 / 1000
    np.testing.assert_allclose(s['std_fwd'], s['std_bwd'][::-1], rtol=1e-12)
    total = math.sqrt(s['betas'].sum())                           # sum beta = 0.1410 (spec 1.3)
    assert s['std_fwd'][0] == pytest.approx(0.01) and s['std_bwd'][-1] == pytest.approx(0.01)
    assert s['std_fwd'][-1] == pytest.approx(total) and s['std_bwd'][0] == pytest.approx(total)
    assert total == pytest.approx(0.37554, abs=1e-4)
    np.testing.assert_allclose(s['mu0'] + s['mu1'], 1.0, rtol=1e-12)
    for n in (0, 250, 600, 999):                                  # I2SB's Gaussian product, by its sums
        fwd, bwd = sum(s['betas'][:n + 1]), sum(s['betas'][n:])   # sigma_n^2 and bar sigma_n^2
        np.testing.assert_allclose([s['mu0'][n], s['mu1'][n], s['std_sb'][n] ** 2],
                                   [bwd / (fwd + bwd), fwd / (fwd + bwd), fwd * bwd / (fwd + bwd)], rtol=1e-10)
    assert s['std_sb'].argmax() in (499, 500) and s['std_sb'].max() == pytest.approx(0.18789, abs=1e-4)
    b = paper_bridge()                                            # the model keeps float32 buffers
    assert all(v.dtype == torch.float32 for v in b.buffers())
    assert lasb.space_indices(1000, 101)[:3] == [0, 10, 20] and lasb.space_indices(1000, 101)[-1] == 999
    with pytest.raises(common.UserError, match='--T must be even'):
        lasb.bridge_schedule(999, 0.1, 0.3)


def marginal_after_posterior(s, prev, n):
    """z_n = mu0[n] z0 + mu1[n] z1 + std_sb[n] eps, then z_prev = a z0^ + b z_n + sqrt(var) eps' with
    z0^ = z0: the coefficients of z0 and z1 and the noise std of z_prev, and those of the marginal."""
    a, b, var = s.coef(prev, n)
    mu0, mu1, sb = float(s.mu0[n]), float(s.mu1[n]), float(s.std_sb[n])
    return ([a + b * mu0, b * mu1, math.sqrt(b * b * sb * sb + var)],
            [float(s.mu0[prev]), float(s.mu1[prev]), float(s.std_sb[prev])])


def test_posterior_maps_marginal_to_marginal():
    # Eq. 4 composed with Eq. 11 at step n gives Eq. 11 at step n-1, for every n. Not exact: I2SB's
    # std_fwd^2 and std_bwd^2 both contain beta_n, so the composition uses sum(beta) + beta_n where the
    # marginal at n-1 has sum(beta) + beta_{n-1}; relative error (beta_n - beta_{n-1}) / std_bwd^2 <= 7e-4.
    s = paper_bridge()
    got, want = zip(*(marginal_after_posterior(s, n - 1, n) for n in range(1, 1000)))
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-3)
    # the sampler's strided steps (nfe 100): the same, with a 10x larger beta difference at the ends
    steps = lasb.space_indices(1000, 101)
    got, want = zip(*(marginal_after_posterior(s, p, n) for p, n in zip(steps[:-1], steps[1:])))
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=2e-3)


def test_oracle_network_recovers_z0():
    s, g = paper_bridge(), torch.Generator().manual_seed(0)
    z0 = torch.randn(4, 3, 16, 16, generator=g)                   # unit-scale normal latents
    z1 = z0 + 2 * torch.randn(4, 3, 16, 16, generator=g)          # far-away anomalous latents
    oracle = lambda z, n: (z - z0) / s.std_fwd[n]                 # the exact Eq. 12 label
    out = s.sample(oracle, z1, 100, lambda: torch.randn(z0.shape, generator=g))
    rms = (out - z0).pow(2).mean().sqrt()
    assert rms < s.std_fwd[0]                                     # 0.0033 < 0.01 (spec 1.4)
    wrong = s.sample(lambda z, n: torch.zeros_like(z), z1, 100, lambda: torch.randn(z0.shape, generator=g))
    assert (wrong - z0).pow(2).mean().sqrt() > 1                  # a useless net does not get there


def test_label_inverts_to_z0():
    s, g = paper_bridge(), torch.Generator().manual_seed(1)
    z0, z1 = torch.randn(8, 3, 8, 8, generator=g), torch.randn(8, 3, 8, 8, generator=g)
    n = torch.tensor([0, 1, 10, 250, 500, 750, 998, 999])
    eps = torch.randn(8, 3, 8, 8, generator=g)
    zt = s.q_sample(n, z0, z1, eps)
    c = lambda a: a[n].view(-1, 1, 1, 1)
    torch.testing.assert_close(zt, c(s.mu0) * z0 + c(s.mu1) * z1 + c(s.std_sb) * eps)   # Eq. 11
    assert (zt[0] - z0[0]).abs().max() < 0.05 and (zt[-1] - z1[-1]).abs().max() < 0.05  # z0 at 0, z1 at T-1
    label = s.label(n, z0, zt)
    torch.testing.assert_close(zt - s.std_fwd[n].view(-1, 1, 1, 1) * label, z0, rtol=0, atol=1e-5)


def test_vq_straight_through_and_nearest_code():
    vq = lasb.VectorQuantizer(16, 3, beta=0.25, decay=0.99, restart=5)
    h = torch.randn(2, 3, 4, 4, requires_grad=True)
    q, commit, idx = vq(h)
    dist = ((h.detach().permute(0, 2, 3, 1)[..., None, :] - vq.embed) ** 2).sum(-1)
    assert torch.equal(idx, dist.argmin(-1))                      # nearest codebook vector
    torch.testing.assert_close(q, vq.embed[idx].permute(0, 3, 1, 2))   # forward: the code
    w = torch.randn_like(q)
    grad, = torch.autograd.grad((q * w).sum(), h)                 # backward: identity (straight through)
    assert torch.equal(grad, w)
    grad, = torch.autograd.grad(commit, h)                        # commitment pulls h to sg(e)
    torch.testing.assert_close(grad, 0.25 * 2 * (h - q).detach() / h.numel())


def test_nearest_code_is_found_in_float32_under_bfloat16_autocast():
    """--dtype bfloat16 runs decode and stage 1 under autocast; the distances |f|^2 - 2 f.e + |e|^2
    in bfloat16 would pick another code for 7% of these latents (35% with 8192 codes)."""
    torch.manual_seed(0)
    vq = lasb.VectorQuantizer(512, 3, beta=0.25, decay=0.99, restart=5)
    h = torch.randn(4, 3, 16, 16)
    with common.autocast('cpu', 'bfloat16'):
        idx = vq.codes(h)
    assert torch.equal(idx, vq.codes(h))


def test_codebook_ema_and_dead_code_restart():
    torch.manual_seed(0)              # seeded: with 3 updates, 7 of 300 seeds left a used code short
    vq = lasb.VectorQuantizer(8, 3, beta=0.25, decay=0.5, restart=3)
    h = torch.randn(2, 3, 4, 4) * 0.1 + 5.0                       # encoder outputs far from N(0,1) codes
    for step in range(4):             # dead codes restart after 3; used ones move halfway per update
        vq.update(h, vq.codes(h), torch.Generator().manual_seed(step))
    flat = h.permute(0, 2, 3, 1).reshape(-1, 3)
    nearest = torch.cdist(vq.embed, flat).min(1).values
    assert (nearest < 1).all()                                    # every code restarted onto the data
    assert len(vq.codes(h).unique()) > 1                          # no collapse onto one code


def test_only_codes_idle_for_restart_updates_jump_to_the_data():
    """A used code's idle count resets at every update; an unused one counts up, barely moves (its EMA
    sum and count shrink together) and jumps onto an encoder output at the restart-th idle update."""
    torch.manual_seed(0)
    vq = lasb.VectorQuantizer(8, 3, beta=0.25, decay=0.5, restart=3)
    vq.idle.zero_()
    h = torch.randn(2, 3, 4, 4) * 0.1 + 5.0                       # far from the N(0,1) codes: few are used
    flat, e0 = h.permute(0, 2, 3, 1).reshape(-1, 3), vq.embed.clone()
    used = torch.bincount(vq.codes(h).flatten(), minlength=8) > 0
    assert 0 < used.sum() < 8
    for step in range(3):
        idx = vq.codes(h)
        assert torch.equal(torch.bincount(idx.flatten(), minlength=8) > 0, used)
        vq.update(h, idx, torch.Generator().manual_seed(step))
        if step < 2:
            assert torch.equal(vq.idle, torch.where(used, 0.0, step + 1.0))
            torch.testing.assert_close(vq.embed[~used], e0[~used], rtol=1e-3, atol=0)
    is_row = lambda e: bool((e == flat).all(1).any())
    assert all(is_row(e) for e in vq.embed[~used]) and not any(is_row(e) for e in vq.embed[used])
    assert not vq.idle.any()


def test_ssim_of_an_image_with_itself_and_of_two_constants():
    """Wang et al.'s SSIM: 1 for identical images; for constant images c, d (no variance, no
    covariance) the luminance term alone, (2cd + C1) / (c^2 + d^2 + C1)."""
    a = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    assert lasb.ssim(a, a).item() == pytest.approx(1.0, abs=1e-5)
    c, d = 0.2, 0.7
    got = lasb.ssim(torch.full((1, 3, 16, 16), c), torch.full((1, 3, 16, 16), d)).item()
    assert got == pytest.approx((2 * c * d + 1e-4) / (c * c + d * d + 1e-4), rel=1e-3)   # float32 variances
    noisy = (a + 0.1 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert 0 < lasb.ssim(a, noisy).item() < 0.95 and lasb.ssim(a, noisy) == lasb.ssim(noisy, a)


def test_codebook_ema_update_is_its_closed_form():
    """One update with no restart: counts and sums are exponential moving averages (decay 0.5 here),
    counts Laplace-smoothed, and each code is its smoothed sum over its smoothed count."""
    torch.manual_seed(0)
    vq = lasb.VectorQuantizer(8, 3, beta=0.25, decay=0.5, restart=100)
    vq.idle.zero_()
    h = torch.randn(2, 3, 4, 4)
    e0, idx = vq.embed.clone(), vq.codes(h)
    flat, i = h.permute(0, 2, 3, 1).reshape(-1, 3), idx.flatten()
    count, total = torch.bincount(i, minlength=8).float(), torch.zeros(8, 3).index_add_(0, i, flat)
    vq.update(h, idx, torch.Generator().manual_seed(0))
    c, s = 0.5 * 1 + 0.5 * count, 0.5 * e0 + 0.5 * total          # the buffers start at count 1, sum e0
    torch.testing.assert_close(vq.embed, s / ((c + 1e-5) / (c.sum() + 8e-5) * c.sum())[:, None])


def test_training_regresses_the_eq_12_label(tmp_path, monkeypatch):
    """The loops of train() itself (not copies): stage 2 bridges each latent_pair (z0 = E(x), z1 = E(x~))
    in that order and fits (z_t - z0) / std_fwd[n]; stage 1 steps the codebook after every step."""
    seen, checked, pairs, updates = {}, [], [], []
    q_sample, mse, pair, update = lasb.Bridge.q_sample, F.mse_loss, lasb.latent_pair, lasb.VectorQuantizer.update

    def q_spy(self, n, z0, z1, eps):
        assert z0 is pairs[-1][0] and z1 is pairs[-1][1]             # normal end z0, anomalous end z1
        zt = q_sample(self, n, z0, z1, eps)
        seen.update(n=n, z0=z0, zt=zt, bridge=self)
        return zt
    monkeypatch.setattr(lasb, 'latent_pair', lambda *a: pairs.append(pair(*a)) or pairs[-1])
    monkeypatch.setattr(lasb.VectorQuantizer, 'update', lambda self, *a: updates.append(self.embed.clone())
                        or update(self, *a))

    def mse_spy(pred, target, *args, **kwargs):
        if seen:
            std = seen['bridge'].std_fwd[seen['n']].view(-1, 1, 1, 1)
            torch.testing.assert_close(target, (seen['zt'] - seen['z0']) / std)
            checked.append(1)
            seen.clear()
        return mse(pred, target, *args, **kwargs)
    monkeypatch.setattr(lasb.Bridge, 'q_sample', q_spy)
    monkeypatch.setattr(lasb.F, 'mse_loss', mse_spy)
    model, _ = lasb.train(micro_cfg(tmp_path, '--ae_steps', '2', '--steps', '2'))
    assert len(checked) == 2 and len(pairs) == 2
    assert len(updates) == 2 and not torch.equal(model.ae.vq.embed, updates[0])   # the codebook moved


def test_bridge_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    cfg = micro_cfg('/tmp/unused')
    net, s = lasb.UNet(cfg), lasb.Bridge(cfg)
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(8, 3, 8, 8, generator=g), torch.randn(8, 3, 8, 8, generator=g)
    n = torch.randint(1000, (8,), generator=g)
    zt = s.q_sample(n, z0, z1, torch.randn(8, 3, 8, 8, generator=g))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = F.mse_loss(net(zt, s.t_net[n]), s.label(n, z0, zt))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """Both stages straight through (4 + 4 steps), checkpoints every 2 steps."""
    cfg = micro_cfg(tmp_path_factory.mktemp('straight'), '--ae_steps', '4', '--steps', '4')
    model, seconds = lasb.train(cfg)
    test = common.load_dataset(model.cfg, 'test')
    idx = [0, 1, 50, 99]                                          # normal and anomalous images
    batch = dict(image=torch.stack([test[i]['image'] for i in idx]), cls=torch.zeros(4, dtype=torch.long),
                 path=[test.paths[i] for i in idx])
    return model, cfg, batch


def test_both_stages_step_their_optimisers(trained):
    """Layers that start at zero have moved: the autoencoder's (stage 1), the bridge U-Net's trained
    weights and their EMA (stage 2). A loop that never stepped its optimiser would leave them at 0."""
    model, cfg, _ = trained
    net = common.read_checkpoint(os.path.join(cfg['out_dir'], 'ckpt.pt'))['net']
    for w in (model.state_dict()['ae.decoder.3.out.weight'], net['out.2.weight'], model.unet.out[-1].weight):
        assert w.abs().sum() > 0


def test_map_and_score_are_diads_by_hand(trained):
    """map = blur(sum over stages of 1 - cos(f(x), f(x^)), bilinear, align_corners) + pixel_weight x
    blur(channel mean of |x - x^|); score = max after score_pool[1] stride-1 average poolings."""
    model, _, batch = trained
    cfg0 = model.cfg
    model.cfg = dict(cfg0, n_samples=1, pixel_weight=0.5, sigma=2.0, score_pool=(3, 2))
    try:
        out = model.predict(batch)
    finally:
        model.cfg = cfg0
    x, xr = batch['image'], out['recon']                  # recon: the sample the map was made from
    with torch.no_grad():
        fmap = sum(F.interpolate(1 - F.cosine_similarity(a, b, dim=1)[:, None], size=x.shape[-2:], mode='bilinear',
                                 align_corners=True) for a, b in zip(model.features(x), model.features(xr)))
    amap = common.gaussian_blur(fmap, 2.0) + 0.5 * common.gaussian_blur((x - xr).abs().mean(1, keepdim=True), 2.0)
    pooled = F.avg_pool2d(F.avg_pool2d(amap, 3, stride=1), 3, stride=1)
    torch.testing.assert_close(out['map'], amap[:, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out['score'], pooled.flatten(1).amax(1), rtol=1e-5, atol=1e-6)


def test_predict_outputs(trained):
    model, cfg, batch = trained
    out = model.predict(batch)
    assert out['map'].shape == (4, 32, 32) and out['score'].shape == (4,)
    assert torch.isfinite(out['map']).all() and (out['map'] >= 0).all()
    assert out['recon'].shape == (4, 3, 32, 32) and 0 <= out['recon'].min() and out['recon'].max() <= 1
    assert out['nfe']['unet'] == 4 and set(out['scores']) == {'feature', 'pixel'}
    ckpt = common.read_checkpoint(os.path.join(cfg['out_dir'], 'ckpt.pt'))
    assert ckpt['stage'] == 2 and ckpt['step'] == 4
    assert ckpt['model']['ae.vq.usage'].sum() == 144 * 8 * 8      # codebook usage is in the checkpoint


def test_random_backbone_residual_branches_are_off(trained):
    # the docstring's account of the offline backbone: timm zero-initialises each block's last
    # BatchNorm scale, BatchNorm recalibration keeps it, so every residual branch outputs 0
    from timm.models.resnet import BasicBlock, Bottleneck
    model = trained[0]
    blocks = [m for m in model.backbone.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    last_bn = [b.bn3 if isinstance(b, Bottleneck) else b.bn2 for b in blocks]
    assert blocks and all(bn.weight.abs().max() == 0 for bn in last_bn)
    assert model.backbone.layer1[0].bn1.running_var.std() > 0                # but it was recalibrated


def test_batch_size_invariance(trained):
    model, cfg, batch = trained
    together = model.predict(batch)
    alone = [model.predict(dict(image=batch['image'][i:i + 1], cls=batch['cls'][i:i + 1],
                                path=batch['path'][i:i + 1])) for i in range(4)]
    torch.testing.assert_close(together['score'], torch.cat([o['score'] for o in alone]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(together['map'], torch.cat([o['map'] for o in alone]), rtol=1e-4, atol=1e-6)
    model.cfg['n_samples'] = 2                                    # averaging samples changes the map
    try:
        assert not torch.equal(model.predict(batch)['map'], together['map'])
    finally:
        model.cfg['n_samples'] = 1


def test_identical_predictions_in_a_fresh_process(trained, tmp_path):
    model, cfg, batch = trained
    torch.save(dict(image=batch['image'], path=batch['path']), tmp_path / 'batch.pt')
    script = ("import torch, common, lasb\n"
              f"model, _ = common.load({os.path.join(cfg['out_dir'], 'ckpt.pt')!r}, lasb.Model)\n"
              f"b = torch.load({str(tmp_path / 'batch.pt')!r}, weights_only=True)\n"
              "out = model.predict(dict(image=b['image'], cls=torch.zeros(4, dtype=torch.long), path=b['path']))\n"
              f"torch.save(dict(map=out['map'], score=out['score']), {str(tmp_path / 'out.pt')!r})\n")
    subprocess.run([sys.executable, '-c', script], cwd=ROOT, check=True, capture_output=True)
    fresh, here = torch.load(tmp_path / 'out.pt', weights_only=True), model.predict(batch)
    assert torch.equal(fresh['score'], here['score']) and torch.equal(fresh['map'], here['map'])


def test_exact_resume_across_both_stages(trained, tmp_path):
    model, cfg, _ = trained
    lasb.train(micro_cfg(tmp_path, '--ae_steps', '2', '--steps', '0'))             # stop inside stage 1
    lasb.train(micro_cfg(tmp_path, '--ae_steps', '4', '--steps', '2', '--resume'))  # ... inside stage 2
    resumed, _ = lasb.train(micro_cfg(tmp_path, '--ae_steps', '4', '--steps', '4', '--resume'))
    a, b = model.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)                # AE, codebook, scale, EMA bridge
    ca, cb = (common.read_checkpoint(os.path.join(d, 'ckpt.pt')) for d in (cfg['out_dir'], tmp_path))
    assert all(torch.equal(ca['net'][k], cb['net'][k]) for k in ca['net'])   # raw bridge weights
    assert cb['stage'] == 2 and cb['step'] == 4
    with pytest.raises(common.UserError, match=r'--ae_lr --vq_decay: this run is past stage 1'):   # not unused
        lasb.train(micro_cfg(tmp_path, '--ae_steps', '4', '--steps', '6', '--resume', '--ae_lr', '0.123',
                             '--vq_decay', '0.5'))


def test_cli_errors(tmp_path, monkeypatch):
    with pytest.raises(common.UserError, match='nfe'):
        lasb.Model(micro_cfg(tmp_path, '--nfe', '1000'))
    with pytest.raises(common.UserError, match='latent'):
        lasb.Model(micro_cfg(tmp_path, '--latent', 'kl'))
    with pytest.raises(common.UserError, match='--score_pool and --anomaly_beta take two values'):
        lasb.Model(micro_cfg(tmp_path, '--score_pool', '4'))
    with pytest.raises(common.UserError, match=r'--score_pool k,n: n stride-1 poolings .* below --image_size 32'):
        lasb.Model(micro_cfg(tmp_path, '--score_pool', '8,8'))    # 56 px of 32: not an error at evaluation
    with pytest.raises(common.UserError, match='--image_size 36 must be divisible by 8'):
        lasb.Model(micro_cfg(tmp_path, '--image_size', '36'))
    with pytest.raises(common.UserError, match='--ae_batch_size must be at least 1 .got 0.'):   # DeCo-Diff's 0 means
        lasb.Model(micro_cfg(tmp_path, '--ae_batch_size', '0'))                                 # batch_size; not here
    for flags, message in ((['--attn_res', '16'], r"--attn_res \(16,\) matches none of the bridge U-Net's latent "
                                                   r'resolutions \(8, 4\); --attn_res= builds no attention'),
                           (['--num_heads', '3'], r'--num_heads 3 must divide each attention width \(16, 16\)'),
                           (['--beta_min', '0.3', '--beta_max', '0.1'], r'need 0 < beta_min <= beta_max \(got 0\.3'),
                           (['--ae_mult='], r'--ae_mult needs one positive multiplier per autoencoder level'),
                           (['--ch', '6'], r'--ch 6 --ch_mult \(1, 2\) --ae_ch 8 --ae_mult .*: num_channels')):
        with pytest.raises(common.UserError, match=message):
            lasb.Model(micro_cfg(tmp_path, *flags))
    with pytest.raises(common.UserError, match=r'--backbone resnet18 --layers \(5,\): .*feature stages 0-4'):
        lasb.Model(micro_cfg(tmp_path, '--layers', '5'))
    with pytest.raises(common.UserError, match=r"--backbone vit_tiny_patch16_224 .*doesn't match model"):
        lasb.Model(micro_cfg(tmp_path, '--backbone', 'vit_tiny_patch16_224'))   # fixed input size: at once
    with pytest.raises(common.UserError, match='no checkpoint'):
        lasb.train(micro_cfg(tmp_path, '--resume'))
    monkeypatch.setattr(common, 'rank_world', lambda: (0, 3))    # as if under torchrun with 3 ranks
    with pytest.raises(common.UserError, match='--ae_batch_size 4 must be divisible by the 3 ranks'):
        lasb.train(micro_cfg(tmp_path))
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_an_empty_validation_split_fails_before_stage_1(tmp_path):
    """The end of stage 1 reports the validation error: without a validation split, stop at once."""
    with pytest.raises(common.UserError, match='val split of weave is empty'):
        lasb.train(micro_cfg(tmp_path, '--val_frac', '0'))
    assert not os.path.exists(tmp_path / 'ckpt.pt')


def test_sampler_steps_by_hand():
    """The bridge sampler for nfe = 1 and 2 written out: z0_hat = z - std_fwd[n] eps_theta, then the
    Eq. 4 posterior from n to the previous index (noise on all but the last step), indices T-1 .. 0."""
    s, g = paper_bridge(), torch.Generator().manual_seed(0)
    z1, e1 = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    net = lambda z, n: 0.3 * z + 0.1 * n / 1000                   # any deterministic eps_theta
    calls, sf = [], s.std_fwd.double()
    counted = lambda z, n: calls.append(n) or net(z, n)

    def posterior(z0_hat, z, prev, n):                             # mean and variance, from std_fwd
        sn2, sp2 = sf[n] ** 2, sf[prev] ** 2
        return ((sn2 - sp2) / sn2 * z0_hat + sp2 / sn2 * z).float(), float(sp2 * (sn2 - sp2) / sn2)
    want = posterior(z1 - sf[999] * net(z1, 999), z1, 0, 999)[0]  # nfe 1: one jump 999 -> 0, no noise
    torch.testing.assert_close(s.sample(counted, z1, 1, lambda: e1), want, atol=1e-5, rtol=1e-5)
    assert calls == [999]
    calls.clear()
    z, var = posterior(z1 - sf[999] * net(z1, 999), z1, 500, 999)  # nfe 2: 999 -> 500 (noised) -> 0
    z = z + math.sqrt(var) * e1
    want = posterior(z - sf[500] * net(z, 500), z, 0, 500)[0]
    torch.testing.assert_close(s.sample(counted, z1, 2, lambda: e1), want, atol=1e-5, rtol=1e-5)
    assert calls == [999, 500]


def test_ema_update_closed_form():
    """ema <- d ema + (1 - d) net with d = min(decay, (1 + n) / (10 + n)) at update n."""
    ema, net = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    for step, decay in ((0, 0.99), (50, 0.5), (5000, 0.99)):
        old = [p.clone() for p in ema.parameters()]
        lasb.ema_update(ema, net, step, decay)
        d = min(decay, (1 + step) / (10 + step))
        for p_old, p_ema, p in zip(old, ema.parameters(), net.parameters()):
            torch.testing.assert_close(p_ema, d * p_old + (1 - d) * p)


def test_latent_pairs_encode_only_the_anomalous_images(tmp_path):
    """A normal training image is paired with itself (z1 = z0, its cached latent); an anomalous
    one with its encoding z1 = E(x~)."""
    torch.manual_seed(0)
    model, g = lasb.Model(micro_cfg(tmp_path)).eval(), torch.Generator().manual_seed(0)
    z_train, images = torch.randn(5, 3, 8, 8, generator=g), torch.rand(4, 3, 32, 32, generator=g)
    batch = dict(image=images, label=torch.tensor([0, 1, 0, 1]), path=['p3', 'p0', 'p4', 'p1'])
    z0, z1 = lasb.latent_pair(model, batch, z_train, {f'p{i}': i for i in range(5)}, 'cpu')
    torch.testing.assert_close(z0, z_train[[3, 0, 4, 1]])
    torch.testing.assert_close(z1[[0, 2]], z0[[0, 2]])
    with torch.no_grad():
        torch.testing.assert_close(z1[[1, 3]], model.encode(images[[1, 3]]))


def test_latent_scale_gives_unit_std_latents_and_cancels_in_decode(tmp_path):
    """After stage 1 the bridge sees unit-std latents; the scale is invisible in D(E(x)), and the
    encoder gets the [-1, 1] images it was trained on."""
    torch.manual_seed(0)
    model = lasb.Model(micro_cfg(tmp_path)).eval()
    images = (torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    data = torch.utils.data.TensorDataset(images)             # finish_autoencoder reads .images
    data.images = images
    x = images[:2].float() / 255
    with torch.no_grad():
        raw, ref = lasb.encode_all(model, images, 'cpu'), model.decode(model.encode(x))   # scale 1
        lasb.finish_autoencoder(model, data, data, model.cfg)
        assert abs(raw.std().item() - 1) > 0.05 and lasb.encode_all(model, images, 'cpu').std().item() == \
            pytest.approx(1.0, rel=1e-4)
        torch.testing.assert_close(model.decode(model.encode(x)), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode(x), model.scale * model.ae.encoder(2 * x - 1))


def test_bridge_lr_steps_down_every_1000_steps(tmp_path, monkeypatch):
    """I2SB's StepLR(1000): lr * lr_gamma ** (step // 1000); resumed at step 999 to see the step."""
    cfg = micro_cfg(tmp_path, '--steps', '1002', '--lr', '1e-3', '--lr_gamma', '0.1', '--log_interval', '1')
    torch.manual_seed(0)
    model = lasb.Model(cfg).eval()
    data = common.load_dataset(model.cfg, 'train')
    opt = torch.optim.AdamW(lasb.UNet(cfg).parameters(), lr=cfg['lr'], weight_decay=0.0)
    msgs, stepped, adamw_step = [], [], torch.optim.AdamW.step
    monkeypatch.setattr(lasb, 'progress', lambda cfg, stage, step, total, clock, msg: msgs.append((step, msg)) or 0.0)
    monkeypatch.setattr(common, 'save', lambda *a, **k: None)
    monkeypatch.setattr(torch.optim.AdamW, 'step', lambda self, *a, **k: (stepped.append(self.param_groups[0]['lr']),
                                                                          adamw_step(self, *a, **k))[1])
    lasb.train_bridge(model, data, model.cfg, dict(step=999, net=model.unet.state_dict(), opt=opt.state_dict()),
                      dict(seconds=0.0, start=time.time()))
    lrs = {step: float(re.search(r'lr (\S+)', msg).group(1)) for step, msg in msgs}
    assert lrs == {1000: 1e-3, 1001: 1e-4, 1002: 1e-4}             # steps 999, 1000, 1001 (0-based)
    assert stepped == pytest.approx([1e-3, 1e-4, 1e-4], rel=1e-12)   # what the optimiser used, as logged


def test_network_time_table():
    """The net sees t = linspace(1e-4, 1, T) * T at step n (I2SB network.py): 0.1 at n = 0, T at T-1."""
    s = paper_bridge()
    np.testing.assert_allclose(s.t_net.numpy(), np.linspace(1e-4, 1.0, 1000) * 1000, rtol=1e-6)
    assert abs(s.t_net[0].item() - 0.1) < 1e-6 and s.t_net[-1].item() == 1000.0


def test_n_samples_average_and_extra_scores_by_hand(trained):
    """n_samples = 2: the feature and pixel maps are the MEAN of the two samples' maps (noise keyed by
    (seed, path, k)); scores['feature'] / ['pixel'] pool each blurred term alone."""
    model, _, batch = trained
    cfg0 = model.cfg
    cfg = model.cfg = dict(cfg0, n_samples=2, pixel_weight=0.5, sigma=2.0, score_pool=(3, 2))
    try:
        out = model.predict(batch)
        x = batch['image']
        with torch.no_grad():
            z1, fx, fmap, pmap = model.encode(x), model.features(x), 0, 0
            for k in range(2):
                gens = [common.generator(cfg['seed'], p, k) for p in batch['path']]
                noise = lambda: torch.stack([torch.randn(z1.shape[1:], generator=g) for g in gens])  # noqa: E731
                xr = model.decode(model.sb.sample(model.eps, z1, cfg['nfe'], noise))
                fmap = fmap + model.feature_distance(fx, xr) / 2
                pmap = pmap + (x - xr).abs().mean(1, keepdim=True) / 2
    finally:
        model.cfg = cfg0
    fmap, pmap = common.gaussian_blur(fmap, 2.0), common.gaussian_blur(pmap, 2.0)
    pool = functools.partial(lasb.image_score, kernel=3, times=2)
    torch.testing.assert_close(out['map'], (fmap + 0.5 * pmap)[:, 0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(pool(fmap), pool(pmap))
    torch.testing.assert_close(out['scores']['feature'], pool(fmap), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out['scores']['pixel'], pool(pmap), rtol=1e-5, atol=1e-6)


def test_random_backbone_is_recalibrated_on_imagenet_normalised_images(tmp_path):
    """prepare_backbone without weights: BatchNorm statistics of the seeded shuffle of (up to 1024)
    training images, ImageNet-normalised, in batches of 64; the backbone ends in eval mode."""
    torch.manual_seed(0)
    model = lasb.Model(micro_cfg(tmp_path))
    fresh = copy.deepcopy(model.backbone)
    data = common.load_dataset(model.cfg, 'train')
    record = lasb.prepare_backbone(model, data, model.cfg)
    assert 'BatchNorm recalibrated' in record['id']
    idx = torch.randperm(len(data), generator=common.generator(model.cfg['seed'], 'bn'))[:1024]
    x = data.images[idx].float() / 255
    common.recalibrate_bn(fresh, [(b - model.mean) / model.std for b in x.split(64)])
    got, want = model.backbone.state_dict(), fresh.state_dict()
    stats = [k for k in want if k.endswith(('running_mean', 'running_var'))]
    assert stats and all(torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-6) for k in stats)
    assert not any(m.training for m in model.backbone.modules())


def test_timestep_embedding_is_cos_then_sin(sinusoids):
    t = torch.tensor([0.0, 0.5, 3.0, 999.0])
    ref = torch.cat(sinusoids(t), 1)                        # [cos, sin]
    torch.testing.assert_close(lasb.timestep_embedding(t, 8), ref, atol=1e-5, rtol=1e-5)


def test_scale_shift_resblock_by_hand(randomise):
    """h = norm2(conv1(resample(SiLU(norm1 x)))) * (1 + scale) + shift, (scale, shift) = chunks of
    Linear(SiLU(emb)); out = skip(resample x) + conv2(SiLU h)."""
    torch.manual_seed(0)
    x, emb = torch.randn(2, 8, 8, 8), torch.randn(2, 12)
    for rs, res in ((None, lambda v: v), ('down', lambda v: F.avg_pool2d(v, 2)),
                    ('up', lambda v: F.interpolate(v, scale_factor=2.0, mode='nearest'))):
        blk = randomise(lasb.ResBlock(8, 16, 12, rs))
        h = blk.norm2(blk.conv1(res(F.silu(blk.norm1(x)))))
        scale, shift = blk.emb(F.silu(emb))[:, :16, None, None], blk.emb(F.silu(emb))[:, 16:, None, None]
        ref = blk.skip(res(x)) + blk.conv2(F.silu(h * (1 + scale) + shift))
        torch.testing.assert_close(blk(x, emb), ref)


def test_attention_runs_only_at_attn_res(tmp_path):
    """attn_res=(8,) on the 8x8 latent, ch_mult 1,2: down n_res x at 8, mid at 4, up (n_res + 1) x at 8."""
    cfg = micro_cfg(tmp_path, '--attn_res', '8')
    torch.manual_seed(0)
    net, seen = lasb.UNet(cfg), []
    for name, m in net.named_modules():
        if isinstance(m, lasb.Attention):
            m.register_forward_hook(lambda m, i, o, name=name: seen.append((name.split('.')[0], i[0].shape[-1])))
    net(torch.randn(1, cfg['embed_dim'], 8, 8), torch.tensor([0.3]))
    n = cfg['num_res_blocks']
    assert seen == [('down', 8)] * n + [('mid', 4)] + [('up', 8)] * (n + 1)


def test_encoder_downsampling_pads_right_and_bottom_then_stride_2_conv(tmp_path):
    torch.manual_seed(0)
    enc = lasb.encoder(8, (1, 2), 1, 3)
    downs = [m for m in enc if isinstance(m, torch.nn.Sequential)]
    assert downs
    x = torch.randn(1, 8, 8, 8)
    for m in downs:
        torch.testing.assert_close(m(x), F.conv2d(F.pad(x, (0, 1, 0, 1)), m[1].weight, m[1].bias, stride=2))


def test_decode_quantises_to_the_codebook_first(tmp_path):
    """decode(z) = (decoder(e[nearest code of z / scale]) + 1) / 2, clamped."""
    torch.manual_seed(0)
    model = lasb.Model(micro_cfg(tmp_path)).eval()
    z = torch.randn(2, model.cfg['embed_dim'], 8, 8)
    e = model.ae.vq.embed[model.ae.vq.codes(z / model.scale)].permute(0, 3, 1, 2)
    torch.testing.assert_close(model.decode(z), ((model.ae.decoder(e) + 1) / 2).clamp(0, 1))
