"""Tests of inversion_ad.py: the DDIM inversion algebra, the official timestep lists, NFE, both score
normalisations, BatchNorm recalibration, save/load in a fresh process, exact resume, CLI errors.
CPU, offline, seeded; a tiny model (the weight-free pixels backbone, 32 px images, a 4x4 feature grid)
keeps the file fast; the EfficientNet-B4 features themselves are checked in the BatchNorm test."""
import copy
import math
import os
import shutil
import subprocess
import sys
import warnings
from unittest import mock

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import common
import inversion_ad as ia

TINY = ['--preset', 'tiny', '--category', 'weave', '--backbone', 'pixels', '--image_size', '32',
        '--feature_size', '4', '--ch', '32', '--ch_mult', '1,2', '--attn_ds', '2', '--num_heads', '2',
        '--batch_size', '8', '--epochs', '1', '--warmup_epochs', '0', '--ckpt_interval', '100', '--device', 'cpu']

C = 3 * ia.PRESETS['tiny']['block'] ** 2   # feature channels of the test model: pixels in b x b blocks


def tiny_cfg(out_dir, *extra):
    return common.get_config(ia.config, ia.PRESETS, TINY + ['--out_dir', str(out_dir), *extra], ia.__file__)


def random_output_model(tmp_path):
    """The tiny model in eval mode with a random output layer (the zero-initialised one predicts 0)."""
    torch.manual_seed(0)
    model = ia.Model(tiny_cfg(tmp_path)).eval()
    torch.nn.init.normal_(model.unet.out[-1].weight, std=0.05)
    return model


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A tiny model trained for one epoch (18 steps), and a fixed test batch."""
    out = tmp_path_factory.mktemp('inv')
    model, _ = ia.train(tiny_cfg(out))
    test = common.load_dataset(model.cfg, 'test')
    idx = [0, 1, 39, 40, 41, 99]                                               # normal and anomalous
    batch = dict(image=torch.stack([test[i]['image'] for i in idx]), cls=torch.zeros(6, dtype=torch.long),
                 path=[test.paths[i] for i in idx])
    return model, batch, out


def test_inversion_step_and_ddim_step_are_exact_inverses():
    g = torch.Generator().manual_seed(0)
    abar = ia.linear_abar(1000)
    x, eps = (torch.randn(4, 8, 5, 5, generator=g, dtype=torch.float64) for _ in range(2))
    for t, t_next in [(0, 999), (0, 1), (333, 666), (500, 999), (998, 999)]:
        a, b = abar[t].item(), abar[t_next].item()
        torch.testing.assert_close(ia.ddim_step(ia.inversion_step(x, eps, a, b), eps, b, a), x, rtol=0, atol=1e-10)
        torch.testing.assert_close(ia.inversion_step(ia.ddim_step(x, eps, b, a), eps, a, b), x, rtol=0, atol=1e-10)


def test_full_pass_with_constant_network_is_invertible():
    """Through the code's timestep list (Eq. 15) and back (Eq. 12) with eps_theta = const: exact.
    The official last step to abar_next = 0 returns eps_theta(x_999, 999) itself (a read-out,
    which discards x, so it has no inverse): check that identity too."""
    g = torch.Generator().manual_seed(1)
    abar = ia.linear_abar(1000).tolist()
    z0 = torch.randn(2, 6, 4, 4, generator=g, dtype=torch.float64)
    c = torch.randn(6, 4, 4, generator=g, dtype=torch.float64)
    const = lambda x, t: c.expand_as(x)
    for S in ia.S_RANGE:
        ts = ia.inversion_timesteps(S)
        x999 = ia.invert(const, z0, ts, abar, prior_step=False)
        torch.testing.assert_close(ia.ddim_sample(const, x999, ts, abar), z0, rtol=0, atol=1e-10)
        assert torch.equal(ia.invert(const, z0, ts, abar), c.expand_as(z0))


def test_timestep_lists_and_range():
    assert ia.inversion_timesteps(2) == [0, 999]
    assert ia.inversion_timesteps(3) == [0, 500, 999]
    assert ia.inversion_timesteps(4) == [0, 333, 666, 999]
    assert ia.inversion_timesteps(5) == [0, 250, 500, 749, 999]
    for S in (0, 1, 11):
        with pytest.raises(common.UserError, match='2..10'):
            ia.inversion_timesteps(S)


def test_paper_unet_size():
    cfg = dict(ia.config, **ia.PRESETS['paper'])
    unet = ia.UNet(272, cfg['ch'], cfg['ch_mult'], cfg['num_res_blocks'], cfg['attn_ds'], cfg['num_heads'])
    n = sum(p.numel() for p in unet.parameters())
    assert abs(n / 121.6e6 - 1) < 0.02, n                                     # official v1 UNetModel: 121.6 M


def test_bn_recalibration_gives_nondegenerate_features():
    torch.manual_seed(0)
    model = ia.Model(dict(ia.config, **dict(ia.PRESETS['tiny'], backbone='efficientnet_b4', image_size=64,
                                            feature_size=4, ch=32)))
    x = torch.rand(8, 3, 64, 64)
    before = model.features(x)
    common.recalibrate_bn(model.backbone, [model.normalise(x)])
    after = model.features(x)
    assert after.shape == (8, 272, 4, 4)
    stage = np.cumsum([0, 24, 32, 56, 160])
    for a, b in zip(stage[:-1], stage[1:]):                                   # every stage, incl. stride 16
        assert after[:, a:b].std() > 0.1 and torch.isfinite(after).all()
    assert before[:, 112:].std() < 0.01                                       # random init: features vanish
    full = timm.create_model(ia.EFFICIENTNET, pretrained=False, features_only=True, out_indices=(0, 1, 2, 3))
    missing, _ = full.load_state_dict(model.backbone.state_dict(), strict=False)
    assert {k.split('.')[1] for k in missing} == {'5', '6'}                    # only the unused blocks dropped
    for a, b in zip(full.eval()(model.normalise(x)), model.backbone(model.normalise(x))):
        assert torch.equal(a, b)                                              # same features as timm's B4


@pytest.mark.parametrize('b', [4, 2])
def test_pixels_backbone_features(b):
    """'pixels': b x b space-to-depth of the (resized) image, each channel standardised per image."""
    model = ia.Model(dict(ia.config, **dict(ia.PRESETS['tiny'], feature_size=4, ch=32, block=b)))
    x = torch.rand(3, 3, 4 * b, 4 * b, generator=torch.Generator().manual_seed(0))   # b g: no resizing
    z = model.features(x)
    assert z.shape == (3, 3 * b * b, 4, 4) and not list(model.backbone.parameters())
    u = torch.nn.functional.pixel_unshuffle(model.normalise(x), b)
    patch = model.normalise(x)[0, 1, b:2 * b, 2 * b:3 * b]                    # green, grid cell (1, 2)
    torch.testing.assert_close(u[0, b * b:2 * b * b, 1, 2], patch.flatten())    # layout
    torch.testing.assert_close(z, (u - u.mean((2, 3), keepdim=True)) / (u.std((2, 3), keepdim=True) + 1e-3))
    torch.testing.assert_close(z.std((2, 3)), torch.ones(3, 3 * b * b), atol=1e-2, rtol=0)
    torch.testing.assert_close(model.features(x[1:2]), z[1:2])               # per image: no batch coupling


def test_train_step_is_eq_9_and_lowers_the_loss(tmp_path):
    """train_step's loss is ||eps_theta(x_t, t) - eps||^2 with its step's t and eps, and its updates
    lower it on a fixed batch."""
    model = random_output_model(tmp_path)      # a zero output's loss, mean(eps^2), ignores t and x_t
    cfg = model.cfg
    ema = copy.deepcopy(model.unet).requires_grad_(False)
    opt = torch.optim.AdamW(model.unet.parameters(), lr=cfg['lr'])
    z0 = torch.randn(8, C, 4, 4, generator=torch.Generator().manual_seed(3))
    g = common.generator(cfg['seed'], 0, 0)                      # step 0's draws, as train_step makes them
    t = torch.randint(0, cfg['T'], (8,), generator=g)
    eps = torch.randn(z0.shape, generator=g)
    ab = model.abar[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        want = F.mse_loss(model.unet(ab.sqrt() * z0 + (1 - ab).sqrt() * eps, t), eps).item()
    path = str(tmp_path / 'ckpt.pt')
    losses = [ia.train_step(model, model.unet, opt, ema, z0, 0, 100, 0, path) for _ in range(30)]
    assert losses[0] == pytest.approx(want, rel=1e-6)
    assert losses[-1] < 0.9 * losses[0]


def test_nfe_is_S_and_predict_shapes(trained):
    model, batch, _ = trained
    calls, S0 = [], model.cfg['S']
    hook = model.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        for S in (2, 3, 4, 5):
            model.cfg['S'], calls[:] = S, []
            out = model.predict(batch)
            assert len(calls) == S and out['nfe']['unet'] == S
    finally:
        hook.remove()
        model.cfg['S'] = S0
    assert out['map'].shape == (6, 32, 32) and out['score'].shape == (6,)
    assert set(out['scores']) == {'nll', 'spatial'} and torch.isfinite(out['map']).all()
    model.cfg['S'] = 11
    with pytest.raises(common.UserError, match='2..10'):
        model.predict(batch)
    model.cfg['S'] = S0


def test_score_normalisations(trained):
    model, batch, _ = trained
    out = model.predict(batch)
    nll, sp = out['scores']['nll'], out['scores']['spatial']
    lo_n, hi_n, lo_s, hi_s = model.val_stats[model.cfg['S'] - ia.S_RANGE[0]]   # the row of this S
    # val: min-max with the validation statistics stored in the checkpoint, per image
    torch.testing.assert_close(out['score'], (nll - lo_n) / (hi_n - lo_n + 1e-8) + (sp - lo_s) / (hi_s - lo_s + 1e-8))
    val = common.load_dataset(model.cfg, 'val')
    v = model.predict(dict(image=torch.stack([val[i]['image'] for i in range(len(val))]),
                           cls=torch.zeros(len(val), dtype=torch.long), path=val.paths))
    torch.testing.assert_close(v['scores']['nll'].min(), lo_n)
    torch.testing.assert_close(v['scores']['spatial'].max(), hi_s)
    outs = dict(score=out['score'].numpy().copy(), scores={k: x.numpy() for k, x in out['scores'].items()})
    model.cfg['score_norm'] = 'val'
    assert np.array_equal(model.postprocess(dict(outs, score=outs['score'].copy()))['score'], outs['score'])
    # test: min-max over the evaluated set (official); the extremes of each term map to 0 and 1
    model.cfg['score_norm'] = 'test'
    s = model.postprocess(dict(outs))['score']
    n_, s_ = outs['scores']['nll'], outs['scores']['spatial']
    expect = (n_ - n_.min()) / (n_.max() - n_.min() + 1e-8) + (s_ - s_.min()) / (s_.max() - s_.min() + 1e-8)
    np.testing.assert_allclose(s, expect, rtol=1e-12)
    assert 0 <= s.min() and s.max() <= 2


def test_batch_size_invariance(trained):
    model, batch, _ = trained
    full = model.predict(batch)
    one = [model.predict(dict(image=batch['image'][i:i + 1], cls=batch['cls'][i:i + 1], path=batch['path'][i:i + 1]))
           for i in range(6)]
    # equal up to float32 rounding of batched convolutions (the NLL sums 10^3 squares)
    torch.testing.assert_close(torch.cat([o['score'] for o in one]), full['score'], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat([o['map'] for o in one]), full['map'], rtol=1e-4, atol=1e-4)


def test_identical_predictions_after_save_load_in_fresh_process(trained, tmp_path):
    model, batch, out = trained
    torch.save(batch, tmp_path / 'batch.pt')
    code = ("import sys, torch, common, inversion_ad as ia; torch.set_num_threads(int(sys.argv[3]));"
            "m, _ = common.load(sys.argv[1], ia.Model); b = torch.load(sys.argv[2], weights_only=True);"
            "o = m.predict(b); torch.save(dict(score=o['score'], map=o['map'], nll=o['scores']['nll']), sys.argv[2])")
    subprocess.run([sys.executable, '-c', code, str(out / 'ckpt.pt'), str(tmp_path / 'batch.pt'),
                    str(torch.get_num_threads())], check=True, cwd=os.path.dirname(ia.__file__))
    fresh, here = torch.load(tmp_path / 'batch.pt', weights_only=True), model.predict(batch)
    assert torch.equal(fresh['score'], here['score']) and torch.equal(fresh['map'], here['map'])
    assert torch.equal(fresh['nll'], here['scores']['nll'])


def test_exact_resume(trained, tmp_path, monkeypatch):
    """18 steps straight == killed after the checkpoint at step 9, then --resume."""
    _, _, straight = trained
    save = common.save

    def save_then_die(path, model, **state):
        save(path, model, **state)
        if state['step'] == 9:
            raise KeyboardInterrupt
    monkeypatch.setattr(common, 'save', save_then_die)
    with pytest.raises(KeyboardInterrupt):
        ia.train(tiny_cfg(tmp_path, '--ckpt_interval', '9'))
    monkeypatch.setattr(common, 'save', save)
    ia.train(tiny_cfg(tmp_path, '--ckpt_interval', '9', '--resume'))
    a, b = common.read_checkpoint(str(straight / 'ckpt.pt')), common.read_checkpoint(str(tmp_path / 'ckpt.pt'))
    assert a['step'] == b['step'] == 18
    for key in ('model', 'ema'):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)


def test_checkpoint_saved_before_calibration_cannot_score_with_val_statistics(tmp_path):
    """val_stats are NaN until the end of training: a mid-run checkpoint refuses val-normalised
    scores (--predict, score_norm=val) instead of printing raw NLL + spatial as if normalised."""
    from PIL import Image
    import eval as E
    model, path, img = ia.Model(tiny_cfg(tmp_path)), str(tmp_path / 'ckpt.pt'), str(tmp_path / 'one.png')
    common.save(path, model, step=3)                             # as a checkpoint saved mid-run
    Image.fromarray(common.synthetic('weave', 'test')[0][50].transpose(1, 2, 0)).save(img)
    with pytest.raises(common.UserError, match='saved mid-run or without the statistics it needs'):
        E.predict(path, img, out=str(tmp_path / 'map.png'))
    outs = dict(score=np.full(2, np.nan), scores=dict(nll=np.array([1.0, 2.0]), spatial=np.array([0.0, 1.0])))
    model.cfg['score_norm'] = 'val'
    with pytest.raises(common.UserError, match='has no validation statistics'):
        model.postprocess(dict(outs))
    model.cfg['score_norm'] = 'test'                             # the test set's own min-max needs none
    np.testing.assert_allclose(model.postprocess(dict(outs))['score'], [0.0, 2.0], atol=1e-7)


def test_val_frac_0_trains_on_all_images_without_validation_statistics(tmp_path):
    """--val_frac 0 (the official code's split): every train/good image is trained on, the validation
    statistics stay unset (score_norm=val refuses), and the test set's own min-max scores as usual."""
    model, _ = ia.train(tiny_cfg(tmp_path, '--val_frac', '0'))
    full = common.load_dataset(model.cfg, 'train')
    assert len(full) == common.SYN_TRAIN and model.val_stats.isnan().all()
    with pytest.raises(common.UserError, match='has no validation statistics'):
        ia.Model(dict(model.cfg, score_norm='val')).postprocess(dict(scores=dict(nll=np.ones(2), spatial=np.ones(2))))


def test_training_further_resets_the_validation_statistics(trained, tmp_path):
    """A finished run resumed with more epochs: its mid-run checkpoints hold no stale statistics of the
    model it continues from (they are recomputed at the new end)."""
    model, _, out = trained
    shutil.copytree(out, tmp_path / 'run')
    saved = []
    with mock.patch.object(common, 'save', lambda path, m, **state: saved.append(m.val_stats.clone())):
        ia.train(tiny_cfg(tmp_path / 'run', '--resume', '--epochs', '2', '--ckpt_interval', '20'))
    assert saved[0].isnan().all() and not saved[-1].isnan().any() and not model.val_stats.isnan().any()


def test_calibration_on_too_few_validation_images_warns(trained, capsys):
    model = copy.deepcopy(trained[0])
    z_val = model.features(trained[1]['image'][:4])
    model.calibrate(z_val)
    assert 'the validation split has 4 image(s), too few' in capsys.readouterr().out
    model.calibrate(torch.cat([z_val, z_val]))
    assert capsys.readouterr().out == ''


def test_a_checkpoint_from_before_block_keeps_its_4x4_blocks(trained, tmp_path, capsys):
    """A checkpoint saved before --block existed used 4x4 blocks (48 channels): it loads with block 4,
    not the tiny preset's 2, and predicts exactly as the model it saved."""
    _, batch, _ = trained
    model, _ = ia.train(tiny_cfg(tmp_path, '--block', '4'))
    c = common.read_checkpoint(str(tmp_path / 'ckpt.pt'))
    del c['config']['block']
    os.makedirs(tmp_path / 'old')
    torch.save(c, tmp_path / 'old' / 'ckpt.pt')
    old, _ = common.load(str(tmp_path / 'old' / 'ckpt.pt'), ia.Model)
    assert old.cfg['block'] == 4 and 'it runs with --block 4' in capsys.readouterr().out
    torch.testing.assert_close(old.predict(batch)['map'], model.eval().predict(batch)['map'], rtol=0, atol=0)


def test_cli_errors(tmp_path, monkeypatch):
    with pytest.raises(common.UserError, match='2..10'):
        ia.train(tiny_cfg(tmp_path, '--S', '11'))
    with pytest.raises(common.UserError, match='--S expects int'):
        common.get_config(ia.config, ia.PRESETS, ['--S', 'two'], ia.__file__)
    for flags, message in ((['--feature_size', '6', '--ch_mult', '1,2,2'], 'feature_size must be a positive multiple of 4'),
                           (['--ch', '48'], 'multiple of 32'),
                           (['--num_heads', '3'], r'divide each attention width \(64, 64\)'),
                           (['--attn_ds', '3'], r'--attn_ds must be among \[1, 2\]'),
                           (['--pixel_norm', 'imagnet'], 'imagenet or half'),
                           (['--score_norm', 'vall'], 'test or val'),
                           (['--block', '0'], 'block must be at least 1'),
                           (['--feature_size', '0'], 'feature_size must be a positive multiple of 2'),
                           (['--num_heads', '0'], '--num_heads 0 must divide'),                 # not a modulo by 0
                           (['--T', '20'], r'--T must be above 20: the betas 1e-4\.\.0\.02 are scaled')):   # beta = 1
        with pytest.raises(common.UserError, match=message):             # at once, not at the first step
            ia.Model(tiny_cfg(tmp_path, *flags))
    unet = ia.Model(tiny_cfg(tmp_path, '--num_heads', '64')).unet       # 64 divides the attention widths, not ch
    assert unet(torch.randn(1, unet.down[0][0].in_channels, 4, 4), torch.tensor([5])).isfinite().all()
    with pytest.warns(UserWarning, match=r"full-resolution width 32 is below the 272 feature channels"):
        ia.Model(tiny_cfg(tmp_path, '--backbone', 'efficientnet_b4'))      # the tiny net on ImageNet features
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        ia.Model(tiny_cfg(tmp_path))                                        # 32 on 12 channels: no warning
    with monkeypatch.context() as m, pytest.raises(common.UserError, match='--warmup_epochs 1 must be fewer than --epochs 1'):
        m.setattr(common, 'load_dataset', None)                      # before any data is read
        ia.train(tiny_cfg(tmp_path, '--warmup_epochs', '1'))
    with pytest.raises(common.UserError, match=r"--backbone pixels \(the tiny preset's\) has no weights: add --backbone"):
        ia.train(tiny_cfg(tmp_path, '--backbone_weights', 'timm'))   # not silently ignored


def test_ema_is_decay_times_old_plus_the_rest_times_new(tmp_path):
    model = random_output_model(tmp_path)
    model.cfg['ema_decay'] = 0.9
    ema, before = copy.deepcopy(model.unet).requires_grad_(False), copy.deepcopy(model.unet.state_dict())
    opt = torch.optim.AdamW(model.unet.parameters(), lr=1e-2)
    z0 = torch.randn(8, C, 4, 4, generator=torch.Generator().manual_seed(3))
    ia.train_step(model, model.unet, opt, ema, z0, 0, 100, 0, str(tmp_path / 'ckpt.pt'))
    after = model.unet.state_dict()
    for k, p_ema in ema.named_parameters():
        torch.testing.assert_close(p_ema, 0.9 * before[k] + 0.1 * after[k], atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_latent_scores_by_hand():
    """Algorithm 1 on a hand-made final latent: the map is the per-position L2 norm (not squared),
    the spatial score its max - min, the NLL 0.5 ||z||^2 + the Gaussian constant."""
    z = torch.zeros(2, 2, 2, 2)
    z[0, :, 0, 0] = torch.tensor([3.0, 4.0])            # norm 5
    z[0, :, 1, 1] = torch.tensor([0.0, 1.0])            # norm 1, as the other two
    z[0, :, 0, 1] = torch.tensor([1.0, 0.0])
    z[0, :, 1, 0] = torch.tensor([0.0, -1.0])
    z[1] = 2.0                                          # norm sqrt(8) everywhere
    nll, spatial, norm = ia.latent_scores(z)
    torch.testing.assert_close(norm[0], torch.tensor([[5.0, 1.0], [1.0, 1.0]]))
    torch.testing.assert_close(norm[1], torch.full((2, 2), 8 ** 0.5))
    torch.testing.assert_close(spatial, torch.tensor([4.0, 0.0]))
    const = 0.5 * 8 * float(np.log(2 * np.pi))
    torch.testing.assert_close(nll, torch.tensor([0.5 * 28 + const, 0.5 * 32 + const]))


def test_the_unet_sees_exactly_the_inversion_timesteps(tmp_path):
    model, seen = random_output_model(tmp_path), []
    model.unet.register_forward_hook(lambda m, args, out: seen.append(args[1].tolist()))
    z0 = torch.randn(2, C, 4, 4, generator=torch.Generator().manual_seed(0))
    for S in (2, 4):
        seen.clear()
        model.invert(z0, S)
        assert seen == [[t, t] for t in ia.inversion_timesteps(S)]


def test_imagenet_normalisation_is_rgb(tmp_path):
    """Invisible to the tiny preset's per-image standardised pixels; EfficientNet sees these values."""
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))
    torch.testing.assert_close(ia.Model(tiny_cfg(tmp_path)).normalise(x), (x - mean) / std)


def test_map_is_the_bilinearly_upsampled_norm_map(tmp_path):
    model = random_output_model(tmp_path)
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = model.predict(dict(image=image, cls=torch.zeros(2, dtype=torch.long), path=['a', 'b']))
    with torch.no_grad():
        norm = ia.latent_scores(model.invert(model.features(image), model.cfg['S']))[2]
    want = F.interpolate(norm[:, None], size=(32, 32), mode='bilinear', align_corners=False)[:, 0]
    torch.testing.assert_close(out['map'], want, atol=1e-5, rtol=1e-5)


def test_lr_warmup_then_cosine_closed_form(tmp_path):
    """init_lr at step 0, linear to lr at step `warmup`, then cosine to min_lr reached at step `total`;
    train_step sets lr_at(step) before its update."""
    cfg = dict(ia.config, init_lr=1e-6, lr=5e-5, min_lr=1e-6)
    total, warmup = 100, 20
    assert ia.lr_at(0, total, warmup, cfg) == cfg['init_lr']
    assert math.isclose(ia.lr_at(5, total, warmup, cfg), 1e-6 + (5e-5 - 1e-6) * 5 / 20, rel_tol=1e-12)
    assert math.isclose(ia.lr_at(10, total, warmup, cfg), (1e-6 + 5e-5) / 2, rel_tol=1e-12)
    assert math.isclose(ia.lr_at(warmup, total, warmup, cfg), cfg['lr'], rel_tol=1e-12)
    assert math.isclose(ia.lr_at(60, total, warmup, cfg), (5e-5 + 1e-6) / 2, rel_tol=1e-12)   # cosine mid-way
    assert math.isclose(ia.lr_at(total, total, warmup, cfg), cfg['min_lr'], rel_tol=1e-12)
    p = (99 - warmup) / (total - warmup)
    assert math.isclose(ia.lr_at(99, total, warmup, cfg), 1e-6 + 0.5 * (5e-5 - 1e-6) * (1 + math.cos(math.pi * p)),
                        rel_tol=1e-12)
    model = random_output_model(tmp_path)
    opt = torch.optim.AdamW(model.unet.parameters(), lr=1.0)
    z0 = torch.randn(8, C, 4, 4, generator=torch.Generator().manual_seed(3))
    ia.train_step(model, model.unet, opt, copy.deepcopy(model.unet), z0, 7, total, warmup, str(tmp_path / 'c.pt'))
    assert opt.param_groups[0]['lr'] == ia.lr_at(7, total, warmup, model.cfg)


def test_train_step_clips_the_gradient_norm(tmp_path):
    """The update uses the U-Net gradient clipped to norm grad_clip (here far below its raw norm)."""
    model = random_output_model(tmp_path)
    model.cfg['grad_clip'] = 1e-3
    opt = torch.optim.AdamW(model.unet.parameters(), lr=1e-3)
    z0 = torch.randn(8, C, 4, 4, generator=torch.Generator().manual_seed(3))
    ia.train_step(model, model.unet, opt, copy.deepcopy(model.unet), z0, 0, 100, 0, str(tmp_path / 'c.pt'))
    norm = torch.cat([p.grad.flatten() for p in model.unet.parameters() if p.grad is not None]).norm()
    assert abs(norm.item() - 1e-3) < 1e-6


def test_timestep_lists_for_every_S():
    """guided-diffusion's space_timesteps(1000, S) for S = 2..10: float stride accumulation and Python's
    round (half to even: S=7 has 166 and 832, not 167 and 833)."""
    want = {2: [0, 999], 3: [0, 500, 999], 4: [0, 333, 666, 999], 5: [0, 250, 500, 749, 999],
            6: [0, 200, 400, 599, 799, 999], 7: [0, 166, 333, 500, 666, 832, 999],
            8: [0, 143, 285, 428, 571, 714, 856, 999], 9: [0, 125, 250, 375, 500, 624, 749, 874, 999],
            10: [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]}
    assert {S: ia.inversion_timesteps(S) for S in ia.S_RANGE} == want


def test_validation_statistics_are_per_S_and_predict_uses_its_row(tmp_path):
    """calibrate() stores, in row S - 2, min/max of NLL and spatial score after S inversion steps;
    predict with --S 3 normalises with row 1 (not another S's)."""
    model = random_output_model(tmp_path)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(6, 3, 32, 32, generator=g)
    z = model.features(image)
    model.calibrate(z)
    for S in (2, 3, 7):
        nll, sp = ia.latent_scores(model.invert(z, S))[:2]
        torch.testing.assert_close(model.val_stats[S - 2], torch.stack([nll.min(), nll.max(), sp.min(), sp.max()]))
    assert not torch.allclose(model.val_stats[0], model.val_stats[1])
    model.cfg['S'] = 3
    out = model.predict(dict(image=image[:2], cls=torch.zeros(2, dtype=torch.long), path=['a', 'b']))
    lo_n, hi_n, lo_s, hi_s = model.val_stats[1]
    nll, sp = out['scores']['nll'], out['scores']['spatial']
    torch.testing.assert_close(out['score'], (nll - lo_n) / (hi_n - lo_n + 1e-8) + (sp - lo_s) / (hi_s - lo_s + 1e-8))


def test_random_backbone_is_recalibrated_on_imagenet_normalised_training_images(tmp_path):
    """prepare_backbone without weights: the BatchNorm statistics are those of the seeded shuffle of
    the training set, ImageNet-normalised, in batches of 64; the backbone ends in eval mode."""
    cfg = tiny_cfg(tmp_path, '--backbone', 'efficientnet_b4')
    torch.manual_seed(0)
    model = ia.Model(cfg)
    fresh = copy.deepcopy(model.backbone)
    data = common.load_dataset(model.cfg, 'train')
    ia.prepare_backbone(model, data, model.cfg)
    order = torch.randperm(len(data), generator=common.generator(cfg['seed'], 'bn'))
    x = torch.stack([data[int(i)]['image'] for i in order])
    common.recalibrate_bn(fresh, [model.normalise(b) for b in x.split(64)])
    got, want = model.backbone.state_dict(), fresh.state_dict()
    stats = [k for k in want if k.endswith(('running_mean', 'running_var'))]
    assert stats and all(torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-6) for k in stats)
    assert not any(m.training for m in model.backbone.modules())


def _unet(**kw):
    torch.manual_seed(0)
    a = dict(c_in=48, ch=32, mult=(1, 2), n_res=1, attn_ds=(2,), heads=2)
    a.update(kw)
    return ia.UNet(**a)


def test_timestep_embedding_is_cos_then_sin(sinusoids):
    """[cos(t f_i), sin(t f_i)], f_i = 10000^(-i/half)."""
    t = torch.tensor([0, 1, 250, 999])
    ref = torch.cat(sinusoids(t), 1)                        # [cos, sin]
    torch.testing.assert_close(ia.timestep_embedding(t, 8), ref, atol=1e-5, rtol=1e-5)


def test_resblock_forward_by_hand(randomise):
    """in_layers(x) + Linear(SiLU(emb)), out_layers, plus the 1x1 skip."""
    torch.manual_seed(0)
    blk = randomise(ia.ResBlock(32, 64, 16))
    x, emb = torch.randn(2, 32, 4, 4), torch.randn(2, 16)
    ref = blk.skip(x) + blk.out_layers(blk.in_layers(x) + blk.emb[1](F.silu(emb))[:, :, None, None])
    torch.testing.assert_close(blk(x, emb), ref)
    assert not torch.allclose(blk(x, emb), blk(x, emb + 1))


def test_attention_runs_only_at_attn_ds():
    """attn_ds=(1,), mult 1,2, n_res 1 on a 4x4 grid: down 1x at 4, middle at 2, up 2x at 4."""
    unet, seen = _unet(attn_ds=(1,)), []
    for name, m in unet.named_modules():
        if isinstance(m, ia.Attention):
            m.register_forward_hook(lambda m, i, o, name=name: seen.append((name.split('.')[0], i[0].shape[-1])))
    unet(torch.randn(1, 48, 4, 4), torch.tensor([7]))
    assert seen == [('down', 4), ('middle', 2), ('up', 4), ('up', 4)]


def test_up_blocks_concatenate_the_popped_skips():
    """Each up block's input ends with the matching down block's output (hs.pop())."""
    unet, hs, ins = _unet(), [], []
    for blk in unet.down:
        blk[-1].register_forward_hook(lambda m, i, o: hs.append(o))
    for blk in unet.up:
        blk[0].register_forward_pre_hook(lambda m, i: ins.append(i[0]))
    unet(torch.randn(2, 48, 4, 4), torch.tensor([3, 900]))
    assert len(ins) == len(hs)
    for x, skip in zip(ins, reversed(hs)):
        torch.testing.assert_close(x[:, -skip.shape[1]:], skip, rtol=0, atol=0)


def test_up_is_nearest_then_conv():
    torch.manual_seed(0)
    up, x = ia.Up(8), torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(up(x), up.conv(x.repeat_interleave(2, 2).repeat_interleave(2, 3)))


@pytest.mark.parametrize('b', [4, 2])
def test_pixels_backbone_resizes_with_antialias(tmp_path, b):
    """32 px -> b g (16 or 8): bilinear, antialiased, then space-to-depth and per-image standardisation."""
    model = ia.Model(tiny_cfg(tmp_path, '--block', str(b)))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    small = F.interpolate(model.normalise(x), size=(4 * b,) * 2, mode='bilinear', antialias=True, align_corners=False)
    u = F.pixel_unshuffle(small, b)
    torch.testing.assert_close(model.features(x), (u - u.mean((2, 3), keepdim=True)) /
                               (u.std((2, 3), keepdim=True) + 1e-3))


def test_efficientnet_features_are_the_stages_in_order():
    """Channels 0:24 stage 1, 24:56 stage 2, 56:112 stage 3, 112:272 stage 4, each bilinearly resized."""
    torch.manual_seed(0)
    model = ia.Model(dict(ia.config, **dict(ia.PRESETS['tiny'], backbone='efficientnet_b4', image_size=64,
                                            feature_size=4, ch=32)))
    x = torch.rand(2, 3, 64, 64)
    fs = model.backbone(model.normalise(x))
    ref = torch.cat([F.interpolate(f, size=(4, 4), mode='bilinear', align_corners=False) for f in fs], 1)
    torch.testing.assert_close(model.features(x), ref)
    assert [f.shape[1] for f in fs] == [24, 32, 56, 160]
