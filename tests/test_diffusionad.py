"""Tests of diffusionad.py: schedule, norm guidance (closed form), losses, training, checkpoints,
inference and the command line. CPU, offline, tiny networks at 32 px."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import diffusionad as d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """32 px networks: intra-op threads only add overhead (and fight on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = ['--image_size', '32', '--ch', '16', '--ch_mult', '1,2', '--attn_res', '16',
        '--seg_ch', '8', '--seg_levels', '3', '--batch_size', '4', '--category', 'weave',
        '--device', 'cpu', '--log_interval', '2']


def tiny_cfg(out_dir, *argv):
    return common.get_config(d.config, d.PRESETS, TINY + ['--out_dir', str(out_dir)] + list(argv),
                             d.__file__)


def tiny_model(tmp_path, seed=0, **kw):
    torch.manual_seed(seed)
    model = d.Model(dict(tiny_cfg(tmp_path), **kw)).eval()
    nn.init.normal_(model.unet.out[-1].weight, std=0.05)   # the zero-initialised output predicts 0
    return model


def images(n, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(image=torch.rand(n, 3, size, size, generator=g), cls=torch.zeros(n, dtype=torch.long),
                path=[f'weave/test/x/{i:03d}.png' for i in range(n)])


def test_schedule_values():
    abar = d.linear_abar(1000, 1e-4, 0.02)
    betas = np.linspace(1e-4, 0.02, 1000)
    assert abar.dtype == torch.float32 and abar.shape == (1000,)
    np.testing.assert_allclose(abar.numpy(), np.cumprod(1 - betas), rtol=1e-6)
    assert abs(abar[0].item() - (1 - 1e-4)) < 1e-7                 # t = 0 is the first step
    for t, value in ((200, 0.656), (299, 0.396), (400, 0.194)):      # official values (spec)
        assert abs(abar[t].item() - value) < 1e-3
    assert 3e-5 < abar[999].item() < 5e-5
    np.testing.assert_allclose(d.linear_abar(100, 1e-4, 0.02).numpy(),              # betas x 1000/T
                               np.cumprod(1 - np.linspace(1e-3, 0.2, 100)), rtol=1e-6)
    x0, eps = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 200, 400, 999])
    a = abar[t].view(-1, 1, 1, 1)
    x_t = d.q_sample(abar, x0, t, eps)
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps)            # Eq. 1
    torch.testing.assert_close(d.x0_from_eps(abar, x_t, t, eps), x0, atol=1e-3, rtol=0)   # Eq. 6 inverts it


def test_norm_guidance_closed_form(tmp_path):
    """Eqs. 7-8 equal (1 - w(1-abar_ts)) x0_s + w(1-abar_ts) n before clamping, in ONE U-Net call."""
    model = tiny_model(tmp_path)
    calls = []
    model.unet.register_forward_hook(lambda *a: calls.append(1))
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 32, 32, generator=g)
    t_s, t_b = torch.tensor([0, 57, 200, 299]), torch.tensor([300, 400, 731, 999])
    eps_s, eps_b = torch.randn(2, 4, 3, 32, 32, generator=g)
    w = 0.7
    with torch.no_grad():
        x0_g, e_s, e_b = d.norm_guided(model.unet, model.abar, x0, t_s, t_b, eps_s, eps_b, w)
        assert len(calls) == 1
        x_ts, x_tb = d.q_sample(model.abar, x0, t_s, eps_s), d.q_sample(model.abar, x0, t_b, eps_b)
        torch.testing.assert_close(e_s, model.unet(x_ts, t_s), atol=1e-5, rtol=0)   # batched = separate
        torch.testing.assert_close(e_b, model.unet(x_tb, t_b), atol=1e-5, rtol=0)   # (both levels)
        x0_s = d.x0_from_eps(model.abar, x_ts, t_s, e_s)
        n = d.x0_from_eps(model.abar, x_tb, t_b, e_b).clamp(-1, 1)
    c = w * (1 - model.abar[t_s]).view(-1, 1, 1, 1)
    assert e_s.abs().mean() > 0.01 and (x0_g - x0_s).abs().max() > 0.01   # not a trivial case
    torch.testing.assert_close(x0_g, (1 - c) * x0_s + c * n, atol=1e-5, rtol=0)


def test_noise_loss_normal_samples_only():
    g = torch.Generator().manual_seed(0)
    e_s, e_b, eps_s, eps_b = torch.randn(4, 3, 2, 8, 8, generator=g)
    e_s.requires_grad_(True)
    loss = d.noise_loss(e_s, e_b, eps_s, eps_b, torch.ones(3, dtype=torch.long))   # all anomalous
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(e_s.grad).all() and e_s.grad.abs().max() == 0
    label = torch.tensor([0, 1, 0])
    per = ((e_s - eps_s) ** 2).mean((1, 2, 3)) + ((e_b - eps_b) ** 2).mean((1, 2, 3))
    expected = (per[0] + per[2]) / 2                                  # Eq. 9 without the 1/2
    torch.testing.assert_close(d.noise_loss(e_s, e_b, eps_s, eps_b, label), expected)


def test_noise_loss_weighs_every_normal_sample_alike_across_ranks(monkeypatch):
    # rank 0 of 2 holds 1 of the global batch's 3 normal samples; after DDP's gradient average
    # over the 2 ranks its weight must be 1/3 (a per-rank mean would give it 1/2)
    monkeypatch.setattr(common, 'rank_world', lambda: (0, 2))
    monkeypatch.setattr(torch.distributed, 'all_reduce', lambda n: n.add_(2))   # rank 1: 2 normal
    e_s, e_b, eps_s, eps_b = torch.randn(4, 2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    per = ((e_s - eps_s) ** 2).mean((1, 2, 3)) + ((e_b - eps_b) ** 2).mean((1, 2, 3))
    loss = d.noise_loss(e_s, e_b, eps_s, eps_b, torch.tensor([0, 1]))
    torch.testing.assert_close(loss / 2, per[0] / 3)


def test_focal_and_mask_loss_by_hand():
    p = [0.9, 0.2, 0.6, 0.01]
    m = [1.0, 0.0, 0.0, 1.0]
    logits = torch.tensor([math.log(q / (1 - q)) for q in p])
    pt = [q if y else 1 - q for q, y in zip(p, m)]                    # probability of the true class
    focal = sum(0.5 * (1 - a) ** 4 * -math.log(a) for a in pt) / 4   # alpha 0.5, gamma 4
    assert abs(d.focal_loss(logits, torch.tensor(m)).item() - focal) < 1e-6
    smooth_l1 = sum(0.5 * (q - y) ** 2 for q, y in zip(p, m)) / 4     # |error| < 1: quadratic branch
    assert abs(d.mask_loss(logits, torch.tensor(m), 5.0).item() - (smooth_l1 + 5 * focal)) < 1e-6


def test_learning_rates_match_the_official_scheduler():
    """The closed form equals CosineAnnealingLR(T_max=10) stepped every iteration, past T_max."""
    cfg = dict(d.config)
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=cfg['lr_seg'])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg['seg_cosine'], eta_min=0)
    for step in range(45):
        assert d.learning_rates(cfg, step, 45)[0] == cfg['lr']
        assert abs(opt.param_groups[0]['lr'] - d.learning_rates(cfg, step, 45)[1]) < 1e-12
        opt.step()
        sched.step()
    once = np.array([d.learning_rates(dict(cfg, anneal=True), step, 45) for step in range(45)])
    assert (once[0] == (cfg['lr'], cfg['lr_seg'])).all() and (np.diff(once, axis=0) < 0).all()
    assert (once[-1] < 0.01 * once[0]).all()                          # both anneal once, to ~0


def test_train_step_loss_is_eq_11(tmp_path):
    """train_step itself (not a copy) optimises noise loss + mask loss (Eq. 11) with its step's draws."""
    model = tiny_model(tmp_path).train()
    cfg, B = model.cfg, 4
    opts = (torch.optim.Adam(model.unet.parameters(), 1e-4), torch.optim.Adam(model.seg.parameters(), 1e-4))
    mask = torch.zeros(B, 1, 32, 32)
    mask[2:, :, 8:20, 10:22] = 1
    batch = dict(images(B), mask=mask, label=torch.tensor([0, 0, 1, 1]))
    g = common.generator(cfg['seed'], 0, 5)                      # step 5's draws, as train_step makes them
    x = model.to_model(batch['image'])
    t_s, t_b = torch.randint(0, cfg['tau'], (B,), generator=g), torch.randint(cfg['tau'], cfg['T'], (B,), generator=g)
    eps_s, eps_b = torch.randn((2,) + x.shape, generator=g).unbind(0)
    with torch.no_grad():
        logits, _, e_s, e_b = model(x, t_s, t_b, eps_s, eps_b)
        want = d.noise_loss(e_s, e_b, eps_s, eps_b, batch['label']) + d.mask_loss(logits, mask[:, 0], cfg['focal_weight'])
    assert d.train_step(model, model, opts, batch, cfg, 5)[0] == pytest.approx(want.item(), abs=1e-5)


def test_train_step_decreases_the_loss_on_a_fixed_batch(tmp_path):
    """The real train_step (its update, not a copy of it) on one batch; called with one step number,
    so its t and noise draws repeat: fixed t and noise."""
    model = tiny_model(tmp_path).train()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g)
    mask = torch.zeros(4, 1, 32, 32)
    mask[2:, :, 8:20, 10:22] = 1
    x[2:, :, 8:20, 10:22] = 1 - x[2:, :, 8:20, 10:22]                 # two anomalous samples
    batch = dict(image=x, mask=mask, label=torch.tensor([0, 0, 1, 1]))
    opts = (torch.optim.Adam(model.unet.parameters(), 2e-3), torch.optim.Adam(model.seg.parameters(), 2e-3))
    losses = [d.train_step(model, model, opts, batch, model.cfg, 5)[0] for _ in range(12)]
    assert losses[-1] < 0.7 * losses[0], losses


def test_predict_shapes_range_and_score(tmp_path):
    model = tiny_model(tmp_path, top_k=2000)
    out = model.predict(images(3))
    assert out['map'].shape == (3, 32, 32) and out['score'].shape == (3,)
    assert out['recon'].shape == (3, 3, 32, 32)
    assert 0 <= out['map'].min() and out['map'].max() <= 1
    assert 0 <= out['recon'].min() and out['recon'].max() <= 1
    assert out['nfe'] == {'unet': 2, 'seg': 1}
    k = round(2000 * 32 * 32 / 256 ** 2)                               # K scales with the map area
    expected = out['map'].flatten(1).sort(1, descending=True).values[:, :k].mean(1)
    torch.testing.assert_close(out['score'], expected)
    model.cfg['top_k'] = 50                                            # K = 0.78 -> at least 1
    torch.testing.assert_close(model.predict(images(3))['score'], out['map'].flatten(1).amax(1))
    model.cfg['top_k'] = 10 ** 6                                       # K > the map: every pixel
    torch.testing.assert_close(model.predict(images(3))['score'], out['map'].flatten(1).mean(1))


def test_predict_runs_t_s_t_b_with_the_images_own_noise(tmp_path):
    model, batch, seen = tiny_model(tmp_path), images(3), []
    model.unet.register_forward_hook(lambda m, args, out: seen.append(args[1].tolist()))
    out = model.predict(batch)
    assert seen == [[200] * 3 + [400] * 3]                             # one U-Net call: t_s, t_b
    eps = common.sample_noise((2, 3, 32, 32), model.cfg['seed'], batch['path'])
    t = lambda v: torch.full((3,), v)
    with torch.no_grad():
        logits = model(model.to_model(batch['image']), t(200), t(400), eps[:, 0], eps[:, 1])[0]
    torch.testing.assert_close(out['map'], torch.sigmoid(logits))


def test_training_draws_t_s_below_tau_and_t_b_above(tmp_path):
    model, seen = tiny_model(tmp_path).train(), []
    cfg, B = model.cfg, 4
    opts = (torch.optim.Adam(model.unet.parameters(), 1e-4), torch.optim.Adam(model.seg.parameters(), 1e-4))
    model.unet.register_forward_hook(lambda m, args, out: seen.append(args[1]))
    batch = dict(images(B), mask=torch.zeros(B, 1, 32, 32), label=torch.tensor([0, 1, 0, 1]))
    for step in range(20):
        d.train_step(model, model, opts, batch, cfg, step)
    t_s, t_b = torch.cat([t[:B] for t in seen]), torch.cat([t[B:] for t in seen])   # [t_s; t_b] per call
    assert 0 <= t_s.min() and t_s.max() < cfg['tau'] <= t_b.min() and t_b.max() < cfg['T']
    assert t_s.max() > 200 and t_b.min() < 500 and t_b.max() > 800     # the whole ranges are drawn


def test_scores_do_not_depend_on_batch(tmp_path):
    model = tiny_model(tmp_path)
    batch = images(4)
    whole = model.predict(batch)['score']
    alone = torch.cat([model.predict(dict(image=batch['image'][i:i + 1], cls=batch['cls'][i:i + 1],
                                          path=batch['path'][i:i + 1]))['score'] for i in range(4)])
    rev = model.predict(dict(image=batch['image'].flip(0), cls=batch['cls'], path=batch['path'][::-1]))
    torch.testing.assert_close(whole, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(whole, rev['score'].flip(0), atol=1e-5, rtol=0)


def test_resume_is_exact_and_checkpoint_predicts_the_same_in_a_fresh_process(tmp_path):
    straight, _ = d.train(tiny_cfg(tmp_path / 'a', '--steps', '4', '--seg_cosine', '3', '--no-anneal'))
    d.train(tiny_cfg(tmp_path / 'b', '--steps', '2', '--seg_cosine', '3', '--no-anneal'))
    resumed, _ = d.train(tiny_cfg(tmp_path / 'b', '--steps', '4', '--seg_cosine', '3', '--no-anneal', '--resume'))
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    batch = images(3)
    torch.save(batch['image'], tmp_path / 'x.pt')
    expected = straight.predict(batch)
    code = (f"import torch, common, diffusionad as d\n"
            f"m, _ = common.load({str(tmp_path / 'a' / 'ckpt.pt')!r}, d.Model)\n"
            f"o = m.predict(dict(image=torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True), cls=torch.zeros(3, dtype=torch.long), "
            f"path={batch['path']!r}))\n"
            f"torch.save(dict(map=o['map'], score=o['score']), {str(tmp_path / 'y.pt')!r})\n")
    subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True)
    got = torch.load(tmp_path / 'y.pt', weights_only=True)
    torch.testing.assert_close(got['score'], expected['score'], atol=1e-6, rtol=0)
    torch.testing.assert_close(got['map'], expected['map'], atol=1e-6, rtol=0)
    with pytest.raises(common.UserError, match='retraining'):           # not an inference key
        common.load(str(tmp_path / 'a' / 'ckpt.pt'), d.Model, overrides={'ch': 8})
    model, _ = common.load(str(tmp_path / 'a' / 'ckpt.pt'), d.Model, overrides={'t_s': 100})
    assert model.cfg['t_s'] == 100


def test_paper_preset_parameter_counts():
    """The official U-Net has 131.7 M parameters and the segmentation net 28.4 M."""
    with torch.device('meta'):
        model = d.Model(dict(d.config, **d.PRESETS['paper']))
    unet = sum(p.numel() for p in model.unet.parameters())
    seg = sum(p.numel() for p in model.seg.parameters())
    assert abs(unet / 131.7e6 - 1) < 0.01 and abs(seg / 28.4e6 - 1) < 0.01


def test_foreground_estimate_objects_only(monkeypatch):
    washer = torch.tensor(common.synthetic('washer', 'train')[0][0]).float() / 255
    fg = d.foreground(washer)
    assert 0.15 < fg.mean() < 0.35 and fg[:4].max() == 0    # the ring (the notch opens its hole)
    assert d.foreground(torch.full((3, 32, 32), 0.5)) is None            # nothing found: no restriction
    seen = {}
    monkeypatch.setattr(common, 'perlin_anomaly', lambda sample, rng, p, beta, dtd_root, fg, dtd_self:
                        seen.update({sample['cls']: (fg, dtd_self)}))
    cfg = dict(d.config, foreground=True)
    names = ('washer', 'weave', 'Class3')              # Class3: a DAGM texture as --data folder names it
    for cls, cat in enumerate(names):
        image = torch.tensor(common.synthetic(cat if cls < 2 else 'grain', 'train')[0][0]).float() / 255
        d.synth_anomaly(dict(image=image, cls=cls), None, cfg, names)
    assert np.array_equal(seen[0][0], fg) and seen[0][1] == 0.5         # object: estimate, 50% self copies
    assert seen[1] == seen[2] == (None, 0.0)           # textures (by name): anywhere, DTD only


def test_cli_errors(tmp_path):
    with pytest.raises(common.UserError, match='did you mean --ch_mult'):
        d.main(['--ch_mul', '8'])
    with pytest.raises(common.UserError, match='--steps expects int'):
        d.main(['--steps', 'many'])
    with pytest.raises(common.UserError, match='no checkpoint'):
        d.main(['--eval', '--out_dir', str(tmp_path)])
    with pytest.raises(common.UserError, match=r'--t_s and --t_b must lie in 0\.\.999'):
        d.main(['--t_b', '1000', '--out_dir', str(tmp_path)])
    with pytest.raises(common.UserError, match='--input_range must be 01 or pm1'):
        d.main(['--input_range', '-11', '--out_dir', str(tmp_path)])
    with pytest.raises(common.UserError, match='--betas and --anomaly_beta take two values'):
        d.main(['--anomaly_beta', '0.5', '--out_dir', str(tmp_path)])
    with pytest.raises(common.UserError, match="segmentation net's BatchNorm needs more than one value"):
        d.train(tiny_cfg(tmp_path, '--image_size', '16', '--seg_levels', '5', '--batch_size', '1'))   # 1x1 x 1
    with pytest.raises(common.UserError, match='--image_size 50 must be divisible by 8'):
        d.main(['--image_size', '50', '--out_dir', str(tmp_path)])      # not a size mismatch mid-forward
    for flags, message in ((['--attn_res', '8'], r"--attn_res \(8,\) matches none of the U-Net's resolutions "
                                                  r'\(32, 16\); --attn_res= builds no attention'),
                           (['--num_heads', '3'], r'--num_heads 3 must divide each attention width \(32, 32\)'),
                           (['--betas', '0.02,0.0001'], '--betas need 0 <= first <= last < T / 1000'),   # reversed
                           (['--T', '500', '--betas', '1e-4,0.5'], '--betas need 0 <= first'),   # 0.5 x 2 = beta 1
                           (['--tau', '0'], r'--tau must lie in 1\.\.999 \(got 0\)'),      # t_s ~ U{0..-1}
                           (['--seg_levels', '1'], '--seg_levels >= 2'),
                           (['--ch', '6', '--num_heads', '1'], r'--ch 6 --ch_mult \(1, 2\): num_channels '
                                                              r'\(18\) must be divisible by num_groups \(4\)')):
        with pytest.raises(common.UserError, match=message):          # at once, not a NaN or a traceback later
            d.Model(tiny_cfg(tmp_path, *flags))
    assert d.Model(tiny_cfg(tmp_path, '--attn_res=')).unet       # no attention at all: allowed
    with pytest.raises(common.UserError, match='nothing to train'):     # not an untrained model evaluated
        d.main(['--steps', '0', '--epochs', '0', '--out_dir', str(tmp_path)])
    if not torch.cuda.is_available():
        with pytest.raises(common.UserError, match='paper preset'):
            d.main(['--preset', 'paper'])
    r = subprocess.run([sys.executable, 'diffusionad.py', '--t_s'], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "error: --t_s needs a value (default 200)"


def test_segmentation_net_sees_the_clamped_guided_reconstruction(tmp_path):
    """Eq. 8's x0_g can leave the image range; the segmentation net gets cat(x, clamp(x0_g))."""
    model, seen = tiny_model(tmp_path), []
    model.seg.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    g = torch.Generator().manual_seed(0)
    x = 2 * torch.rand(3, 3, 32, 32, generator=g) - 1
    t_s, t_b = torch.full((3,), 200), torch.full((3,), 400)
    eps_s, eps_b = torch.randn(2, 3, 3, 32, 32, generator=g)
    with torch.no_grad():
        _, x0_g, _, _ = model(x, t_s, t_b, eps_s, eps_b)
        raw = d.norm_guided(model.unet, model.abar, x, t_s, t_b, eps_s, eps_b, model.cfg['w'])[0]
    assert raw.abs().max() > 1.1                                   # a case where the clamp matters
    torch.testing.assert_close(x0_g, raw.clamp(-1, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(seen[0], torch.cat([x, raw.clamp(-1, 1)], 1), atol=1e-6, rtol=0)


def test_segmentation_loss_alone_trains_the_unet(tmp_path):
    """As the official code: x0_g is not detached, so on an all-anomalous batch (noise loss 0) the
    segmentation loss still gives the U-Net a gradient."""
    model = tiny_model(tmp_path).train()
    g = torch.Generator().manual_seed(0)
    x = 2 * torch.rand(4, 3, 32, 32, generator=g) - 1
    mask = torch.zeros(4, 32, 32)
    mask[:, 8:20, 8:20] = 1
    t_s, t_b = torch.tensor([10, 50, 100, 200]), torch.tensor([300, 400, 500, 600])
    eps_s, eps_b = torch.randn(2, 4, 3, 32, 32, generator=g)
    logits, _, e_s, e_b = model(x, t_s, t_b, eps_s, eps_b)
    loss = d.noise_loss(e_s, e_b, eps_s, eps_b, torch.ones(4, dtype=torch.long)) + d.mask_loss(logits, mask, 5.0)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.unet.parameters())


def test_anneal_is_one_cosine_over_exactly_the_run():
    """--anneal: both LRs are base * (1 + cos(pi step / steps)) / 2: half at steps / 2."""
    cfg = dict(d.config, anneal=True)
    for steps in (10, 1900):
        for step in (0, steps // 4, steps // 2, steps - 1):
            c = (1 + math.cos(math.pi * step / steps)) / 2
            lr, lr_seg = d.learning_rates(cfg, step, steps)
            assert abs(lr - cfg['lr'] * c) < 1e-15 and abs(lr_seg - cfg['lr_seg'] * c) < 1e-15
        assert d.learning_rates(cfg, steps // 2, steps) == (cfg['lr'] / 2, cfg['lr_seg'] / 2)


def test_top_k_rounds_the_area_scaled_k(tmp_path):
    """K = round(top_k * H * W / 256^2): top_k 100 at 32 px gives 1.5625 -> 2 (not 1)."""
    model = tiny_model(tmp_path, top_k=100)
    out = model.predict(images(3))
    top2 = out['map'].flatten(1).sort(1, descending=True).values[:, :2].mean(1)
    assert (out['map'].flatten(1).amax(1) - top2).min() > 0        # a case where K matters
    torch.testing.assert_close(out['score'], top2)


def test_training_loop_uses_the_lr_of_each_step(tmp_path, monkeypatch):
    """train() sets learning_rates(cfg, step, steps) on both optimisers before step `step`."""
    seen, step_fn = [], d.train_step

    def spy(net, model, opts, batch, cfg, step):
        seen.append((step, opts[0].param_groups[0]['lr'], opts[1].param_groups[0]['lr']))
        return step_fn(net, model, opts, batch, cfg, step)
    monkeypatch.setattr(d, 'train_step', spy)
    d.train(tiny_cfg(tmp_path, '--steps', '3', '--anneal'))
    cfg = tiny_cfg(tmp_path, '--steps', '3', '--anneal')
    assert [s for s, _, _ in seen] == [0, 1, 2]
    for step, lr, lr_seg in seen:
        assert (lr, lr_seg) == d.learning_rates(cfg, step, 3)
    assert seen[0][1:] == (cfg['lr'], cfg['lr_seg'])                # the first step at the full LR


def test_foreground_reference_colour_is_the_border_median():
    """An object touching 3/8 of the border must not shift the background colour (a mean would:
    then every pixel differs from it by > thresh and the mask is the whole image)."""
    x = torch.full((3, 32, 32), 0.2)
    x[:, :12, :] = 0.9                                              # object along the top edge
    fg = d.foreground(x)                                            # (closing erodes the image edge)
    assert (fg[16:] == 0).all() and (fg[3:9, 3:29] == 1).all()


def test_foreground_fills_enclosed_holes():
    """A closed ring: the estimate is the filled disc, hole included."""
    yy, xx = np.mgrid[:32, :32]
    r = np.hypot(yy - 15.5, xx - 15.5)
    x = torch.full((3, 32, 32), 0.3)
    x[:, torch.from_numpy((r >= 5) & (r <= 10))] = 0.8
    fg = d.foreground(x)
    assert fg[16, 16] == 1 and np.array_equal(fg, (r <= 10).astype(np.float32))


def test_input_range_maps_images_to_the_unets_range(tmp_path):
    """pm1 (the tiny preset's): the U-Net and the segmentation net get 2x - 1; 01: x itself."""
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for rng, want in (('pm1', 2 * x - 1), ('01', x)):
        model, seen = tiny_model(tmp_path, input_range=rng), []
        assert model.cfg['input_range'] == rng
        model.seg.register_forward_hook(lambda m, args, out: seen.append(args[0][:, :3]))
        model.predict(dict(image=x, cls=torch.zeros(2, dtype=torch.long), path=['a', 'b']))
        torch.testing.assert_close(seen[0], want)


def test_timestep_embedding_is_sin_then_cos_with_max_period_10000(sinusoids):
    """[sin(t f_i), cos(t f_i)], f_i = 10000^(-i/half), raw integer t."""
    t, dim = torch.tensor([0, 1, 37, 999]), 8
    e = d.timestep_embedding(t, dim)
    ref = torch.cat(sinusoids(t)[::-1], 1)                  # [sin, cos]
    torch.testing.assert_close(e, ref, atol=1e-5, rtol=1e-5)


def test_resblock_forward_by_hand(randomise):
    """GN-SiLU-[resample]-conv1 + Linear(SiLU(temb)), GN-SiLU-conv2, plus the resampled skip."""
    torch.manual_seed(0)
    x, temb = torch.randn(2, 8, 8, 8), torch.randn(2, 12)
    for rs, pool in ((None, lambda v: v), ('down', lambda v: F.avg_pool2d(v, 2)),
                     ('up', lambda v: F.interpolate(v, scale_factor=2.0))):
        blk = randomise(d.ResBlock(8, 16, 12, rs))
        h = blk.conv1(pool(F.silu(blk.norm1(x)))) + blk.emb(F.silu(temb))[:, :, None, None]
        ref = blk.skip(pool(x)) + blk.conv2(F.silu(blk.norm2(h)))
        torch.testing.assert_close(blk(x, temb), ref)
        assert not torch.allclose(blk(x, temb), blk(x, temb + 1))          # the timestep reaches the block


def test_new_attention_and_resblocks_are_the_identity(tmp_path):
    """Zero-initialised output projection / last conv: a fresh Attention and same-width ResBlock return x."""
    unet = tiny_model(tmp_path).unet
    x = torch.randn(2, 32, 8, 8)
    att = [m for m in unet.modules() if isinstance(m, d.Attention)]
    assert att and all(torch.equal(m(x), x) for m in att if m.qkv.in_channels == 32)
    for m in att:
        assert not m.proj.weight.any() and not m.proj.bias.any()
    temb = torch.randn(2, unet.time[-1].out_features)
    same = [m for m in unet.modules() if isinstance(m, d.ResBlock) and m.resample is None
            and m.conv1.in_channels == m.conv1.out_channels == 32]
    assert same and all(torch.equal(m(x, temb), x) for m in same)


def test_attention_runs_only_at_the_attention_resolutions(tmp_path):
    """attn_res=(32,) at 32 px, mults 1,2: down n_res x at 32, mid 1x at 16, up (n_res + 1) x at 32."""
    model = tiny_model(tmp_path, attn_res=(32,))
    seen = []
    for name, m in model.unet.named_modules():
        if isinstance(m, d.Attention):
            m.register_forward_hook(lambda m, i, o, name=name: seen.append((name.split('.')[0], i[0].shape[-1])))
    model.unet(torch.randn(1, 3, 32, 32), torch.tensor([5]))
    n = model.cfg['num_res_blocks']
    assert seen == [('down', 32)] * n + [('mid', 16)] + [('up', 32)] * (n + 1)


def test_unet_up_blocks_concatenate_the_popped_skips(tmp_path):
    """Each up unit's input is cat([h, hs.pop()]): its last channels are the matching down activation."""
    unet = tiny_model(tmp_path).unet
    hs, ins = [], []
    unet.inp.register_forward_hook(lambda m, i, o: hs.append(o))
    for layers in unet.down:
        layers[-1].register_forward_hook(lambda m, i, o: hs.append(o))
    for layers in unet.up:
        layers[0].register_forward_pre_hook(lambda m, i: ins.append(i[0]))
    unet(torch.randn(2, 3, 32, 32), torch.tensor([3, 400]))
    assert len(ins) == len(hs)
    for x, skip in zip(ins, reversed(hs)):
        torch.testing.assert_close(x[:, -skip.shape[1]:], skip, rtol=0, atol=0)


def test_segnet_wiring():
    """enc[i] (i > 0) sees max_pool2d(enc[i - 1] output, 2); dec[i] sees cat([up[i](h), enc[i] output])."""
    torch.manual_seed(0)
    seg = d.SegNet(4, 3).eval()
    enc_in, enc_out, dec_in = {}, {}, {}
    for i, b in enumerate(seg.enc):
        b.register_forward_pre_hook(lambda m, a, i=i: enc_in.__setitem__(i, a[0]))
        b.register_forward_hook(lambda m, a, o, i=i: enc_out.__setitem__(i, o))
    for i, b in enumerate(seg.dec):
        b.register_forward_pre_hook(lambda m, a, i=i: dec_in.__setitem__(i, a[0]))
    seg(torch.randn(2, 6, 16, 16))
    for i in (1, 2):
        torch.testing.assert_close(enc_in[i], F.max_pool2d(enc_out[i - 1], 2), rtol=0, atol=0)
    for i in dec_in:
        torch.testing.assert_close(dec_in[i][:, -enc_out[i].shape[1]:], enc_out[i], rtol=0, atol=0)


def test_groupnorm_groups():
    """min(32, c/4) groups: 32 from 128 channels up (ADM)."""
    assert [d.norm(c).num_groups for c in (16, 64, 128, 256, 512)] == [4, 16, 32, 32, 32]
