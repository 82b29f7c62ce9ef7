"""Tests of omiad.py: the equations (Eq. 7-8 mask, Eq. 27 SiD loss, the shared-weight
discriminator), the ASD loop, NFE, checkpoints in a fresh process, batch-size invariance and exact
resume across both stages. CPU, offline, a few seconds of training on 64 px synthetic images."""
import copy
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F

import common
import omiad

TINY = ['--category', 'weave', '--image_size', '64', '--feature_size', '8', '--ch', '32', '--attn_res', '4',
        '--num_heads', '2', '--batch_size', '4', '--bn_images', '16', '--val_images', '4', '--amdm_steps', '4',
        '--asd_steps', '4', '--psi_warmup', '1', '--adv_start', '2', '--log_interval', '2',
        '--ckpt_interval', '2', '--t_init', '200', '--device', 'cpu']


def tiny_cfg(out_dir, *argv):
    return common.get_config(omiad.config, omiad.PRESETS, TINY + ['--out_dir', str(out_dir), *argv],
                             omiad.__file__)


def batch(n=6, size=64):
    """n weave test images (normal and anomalous) at size px, with their dataset paths."""
    images, _, _, paths = common.synthetic('weave', 'test')
    idx = torch.linspace(0, len(paths) - 1, n).long()
    x = F.interpolate(torch.as_tensor(images[idx.numpy()]).float() / 255, size=(size, size), mode='bilinear')
    return dict(image=x, cls=torch.zeros(n, dtype=torch.long), path=[paths[i] for i in idx])


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """One straight training run (4 AMDM + 4 ASD steps); every checkpoint written is also copied."""
    out = tmp_path_factory.mktemp('straight')
    saved, save = [], common.save

    def save_and_copy(path, model, **state):
        save(path, model, **state)
        saved.append(shutil.copy(path, f"{path}.stage{state['stage']}_step{state['step']}"))
    common.save = save_and_copy
    try:
        model, _ = omiad.train(tiny_cfg(out))
    finally:
        common.save = save
    return model, out, saved


def test_feat_norm_standardises_each_channel_with_the_training_set_statistics(tmp_path):
    """--feat_norm: a fresh run sets feat_mean/feat_std (persistent buffers, so saved) from the training
    features, after which those have per-channel mean 0 and std 1; a resumed run keeps them."""
    cfg = tiny_cfg(tmp_path, '--feat_norm', '--backbone', 'pixels', '--block', '2', '--no-cache_features')
    model = omiad.Model(cfg)
    images = batch(8)['image']
    data = [dict(image=x) for x in images]
    assert omiad.training_features(model, data, cfg, fresh=True) is None       # not cached, buffers set
    x0 = model.features(images)
    torch.testing.assert_close(x0.mean((0, 2, 3)), torch.zeros(12), atol=1e-5, rtol=0)
    torch.testing.assert_close(x0.std((0, 2, 3)), torch.ones(12), atol=1e-5, rtol=0)
    assert {'feat_mean', 'feat_std'} <= set(model.state_dict())
    kept = model.feat_std.clone()
    omiad.training_features(model, data[:3], cfg, fresh=False)
    assert torch.equal(model.feat_std, kept)


def test_mask_probability_eq7():
    cfg = dict(omiad.config)
    p = omiad.mask_prob(torch.tensor([0, 250, 500, 1000]), cfg)
    assert torch.allclose(p, torch.tensor([0.1, 0.1 + 0.3 / 16, 0.175, 0.4]))
    p3 = omiad.mask_prob(torch.tensor([500]), dict(cfg, kappa=3.0, p_min=0.0, p_max=1.0))
    assert torch.allclose(p3, torch.tensor([0.125]))


@pytest.mark.parametrize('granularity', ['spatial', 'element'])
def test_mask_statistics_eq8(granularity):
    cfg = dict(omiad.config, mask=granularity)
    t = torch.tensor([0] * 200 + [999] * 200)
    keep = omiad.adaptive_mask((400, 6, 16, 16), t, cfg, torch.Generator().manual_seed(0))
    assert set(keep.unique().tolist()) == {0.0, 1.0}
    assert abs(keep[:200].mean() - 0.9) < 0.005 and abs(keep[200:].mean() - (1 - 0.3997)) < 0.005
    same_over_channels = bool((keep == keep[:, :1]).all())
    assert same_over_channels == (granularity == 'spatial')


def test_sid_loss_is_eq27_and_sids_x0_loss():
    g = torch.Generator().manual_seed(0)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    eps_phi, eps_psi, eps, x_g = (torch.randn(3, 5, 4, 4, generator=g, dtype=torch.float64) for _ in range(4))
    t, alpha = torch.tensor([10, 500, 990]), 1.2
    loss, _ = omiad.sid_loss(eps_phi, eps_psi, eps, t, abar, alpha)
    # Eq. 27 by hand, gamma(t) = (sigma^2 / abar) / wf with wf = mean |x_g - x0_hat_phi| (SiD)
    a = abar[t].view(-1, 1, 1, 1)
    s = (1 - a).sqrt()
    x_t = a.sqrt() * x_g + s * eps
    x_r, x_f = (x_t - s * eps_phi) / a.sqrt(), (x_t - s * eps_psi) / a.sqrt()   # teacher / student x0
    wf = (x_g - x_r).abs().mean((1, 2, 3), keepdim=True)
    delta = eps_psi - eps_phi
    eq27 = ((s ** 2 / a) / wf * (delta * (eps - eps_phi) - alpha * delta ** 2)).mean()
    sid_code = ((x_r - x_f) * ((x_r - x_g) - alpha * (x_r - x_f)) / wf).mean()   # SiD's x0 form
    assert torch.allclose(loss, eq27, rtol=1e-9) and torch.allclose(loss, sid_code, rtol=1e-9)
    # Algorithm 1 line 13 differs from Eq. 15/27 by exactly one gamma ||Delta||^2 term
    line13 = ((s ** 2 / a) / wf * ((eps_phi - eps_psi) * (eps_psi - eps) - alpha * delta ** 2)).mean()
    assert torch.allclose(line13 - loss, ((s ** 2 / a) / wf * -delta ** 2).mean(), rtol=1e-9)


def test_sid_gradient_matches_x0_form():
    """The eps-space loss and SiD's x0-space loss give the generator the same gradient."""
    g = torch.Generator().manual_seed(1)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    W1, W2 = (torch.randn(5, 5, generator=g, dtype=torch.float64) for _ in range(2))
    eps, t = torch.randn(2, 5, 3, 3, generator=g, dtype=torch.float64), torch.tensor([100, 700])
    a = abar[t].view(-1, 1, 1, 1)
    grads = []
    for form in ('eps', 'x0'):
        x_g = torch.randn(2, 5, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64,
                          requires_grad=True)
        x_t = a.sqrt() * x_g + (1 - a).sqrt() * eps
        eps_phi, eps_psi = (torch.einsum('oc,bchw->bohw', W, torch.tanh(x_t)) for W in (W1, W2))
        if form == 'eps':
            loss = omiad.sid_loss(eps_phi, eps_psi, eps, t, abar, 1.0)[0]
        else:
            x_r, x_f = ((x_t - (1 - a).sqrt() * e) / a.sqrt() for e in (eps_phi, eps_psi))
            wf = (x_g - x_r).abs().mean((1, 2, 3), keepdim=True).detach()
            loss = ((x_r - x_f) * ((x_r - x_g) - (x_r - x_f)) / wf).mean()
        grads.append(torch.autograd.grad(loss, x_g)[0])
    assert torch.allclose(grads[0], grads[1], rtol=1e-7, atol=1e-12)


def test_discriminator_map_shape(tmp_path):
    cfg = tiny_cfg(tmp_path, '--ch_mult', '1,2,2')
    net = omiad.UNet(cfg, 272)
    x, t = torch.randn(3, 272, 8, 8), torch.tensor([0, 500, 990])
    eps, d = net(x, t, logits=True)
    assert eps.shape == x.shape and d.shape == (3, 2, 2)            # 8 / 2^(3-1), channel mean
    assert torch.allclose(net.disc(x, t), d)                       # encoder-only pass, same map
    assert torch.allclose(d, net.encode(x, t)[0][-1].mean(1))


def test_unet_narrower_than_the_features_cannot_span_them(tmp_path):
    """Every path to the output runs through the ch-wide top level, so eps_hat lies in a subspace of
    dimension <= ch S^2 < C S^2: the Jacobian of a (randomised) U-Net is rank-deficient, and Model
    warns. A net of width >= C exceeds that bound (GroupNorm alone keeps it a little below C S^2)."""
    def rank(ch):
        net = omiad.UNet(dict(tiny_cfg(tmp_path), ch=ch, ch_mult=(1,), attn_res=()), 48)
        torch.nn.init.normal_(net.out[-1].weight, std=0.1)           # undo the zero initialisation
        x, t = torch.randn(1, 48, 2, 2), torch.tensor([500])
        jac = torch.autograd.functional.jacobian(lambda v: net(v.view(1, 48, 2, 2), t).flatten(), x.flatten())
        return torch.linalg.matrix_rank(jac).item()
    assert rank(32) <= 32 * 4 < rank(64)
    with pytest.warns(UserWarning, match='below the 48 feature channels'):
        omiad.Model(tiny_cfg(tmp_path, '--ch', '32'))


@pytest.mark.parametrize('b', [4, 2])
def test_pixel_features_are_space_to_depth(tmp_path, b):
    """backbone='pixels': x0[:, b^2 c + b i + j, y, x] = normalised pixel (c, b y + i, b x + j)."""
    model = omiad.Model(tiny_cfg(tmp_path, '--block', str(b)))      # 64 px in, 8x8 grid -> 8b px
    image = torch.rand(2, 3, 64, 64)
    x0 = model.features(image)
    small = F.interpolate((image - model.pixel_mean) / model.pixel_std, size=(8 * b, 8 * b), mode='bilinear',
                          antialias=True, align_corners=False)
    assert x0.shape == (2, 3 * b * b, 8, 8) and isinstance(model.backbone, omiad.Pixels)
    assert model.teacher.inp.in_channels == 3 * b * b
    assert torch.equal(x0[:, b * b * 2 + b * 1 + (b - 1), 5, 6], small[:, 2, b * 5 + 1, b * 6 + b - 1])


def test_random_efficientnet_is_bn_recalibrated_and_saved(tmp_path):
    """backbone='efficientnet_b4' without weights: BatchNorm statistics re-estimated on training
    images (so the stage-1 channels come out at unit scale), stored in the model's state dict."""
    cfg = tiny_cfg(tmp_path, '--backbone', 'efficientnet_b4', '--image_size', '32', '--feature_size', '4')
    model = omiad.Model(cfg)
    bn = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_var.clone()
    data = common.load_dataset(model.cfg, 'train')
    omiad.setup_backbone(model, model.cfg, data)
    assert not torch.equal(before, bn.running_var) and 'random init' in model.cfg['backbone_record']['id']
    x0 = model.features(data.images[:8].float() / 255)
    assert x0.shape == (8, 272, 4, 4) and 0.5 < x0[:, :24].std() < 2     # stage 1: unit scale
    assert any(k.startswith('backbone.') and k.endswith('running_var') for k in model.state_dict())
    full = timm.create_model('tf_efficientnet_b4', pretrained=False, features_only=True, out_indices=(0, 1, 2, 3))
    missing, _ = full.load_state_dict(model.backbone.state_dict(), strict=False)
    assert {k.split('.')[1] for k in missing} == {'5', '6'}                  # only the unused blocks dropped
    x = (data.images[:2].float() / 255 - model.pixel_mean) / model.pixel_std
    assert all(torch.equal(a, b) for a, b in zip(full.eval()(x), model.backbone(x)))   # timm's B4 features


def test_amdm_loss_decreases_on_a_fixed_batch(tmp_path):
    torch.manual_seed(0)
    model = omiad.Model(tiny_cfg(tmp_path))
    x0, net = torch.randn(4, 48, 8, 8), model.teacher.requires_grad_(True)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = omiad.amdm_loss(model, x0, common.generator(0, 'fixed'))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_asd_losses_finite_and_updates_move_networks(tmp_path):
    torch.manual_seed(0)
    model = omiad.Model(tiny_cfg(tmp_path))
    cfg, x0 = model.cfg, torch.randn(4, 48, 8, 8)
    g, psi = model.generator.requires_grad_(True), copy.deepcopy(model.teacher).requires_grad_(True)
    g0, psi0 = copy.deepcopy(g.state_dict()), copy.deepcopy(psi.state_dict())
    opt_g, opt_psi = (torch.optim.Adam(n.parameters(), lr=1e-3, betas=(0.0, 0.999)) for n in (g, psi))
    for step in range(3):
        gen = common.generator(0, step)
        x_g = model.generate(g, x0, torch.randn(x0.shape, generator=gen), cfg['t_init'])
        losses = omiad.psi_update(model, psi, opt_psi, x0, x_g.detach(), gen, cfg)
        opt_psi.step()
        psi.requires_grad_(False)
        losses += omiad.generator_loss(model, psi, x_g, gen, cfg, use_adv=True)
        opt_g.zero_grad()
        losses[3].backward()
        opt_g.step()
        psi.requires_grad_(True)
        assert all(torch.isfinite(v).all() for v in losses)
    assert any(not torch.equal(v, psi.state_dict()[k]) for k, v in psi0.items())
    assert any(not torch.equal(v, g.state_dict()[k]) for k, v in g0.items())


def test_generator_loss_is_sid_plus_the_adversarial_term(tmp_path):
    """generator_loss returns Eq. 27 at its own t and eps (drawn from gen) and adds lambda_adv * Eq. 18."""
    torch.manual_seed(0)
    model = omiad.Model(tiny_cfg(tmp_path))
    cfg, x0, psi = model.cfg, torch.randn(4, 48, 8, 8), copy.deepcopy(model.teacher)
    torch.nn.init.normal_(psi.out[-1].weight, std=0.05)        # psi != phi, so Delta != 0
    x_g = model.generate(model.generator, x0, torch.randn(x0.shape, generator=common.generator(0, 0)), cfg['t_init'])
    total, l_sid, l_adv = omiad.generator_loss(model, psi, x_g, common.generator(0, 1), cfg, use_adv=True)
    g = common.generator(0, 1)
    t = torch.randint(0, cfg['t_max'] + 1, (4,), generator=g)
    eps = torch.randn(x_g.shape, generator=g)
    x_t = omiad.q_sample(x_g, t, eps, model.abar)
    with torch.no_grad():
        want = omiad.sid_loss(model.teacher(x_t, t).float(), psi(x_t, t).float(), eps, t, model.abar, cfg['alpha'])[0]
    torch.testing.assert_close(l_sid, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(total.detach(), l_sid + cfg['lambda_adv'] * l_adv, rtol=1e-6, atol=1e-9)


def test_adversarial_and_student_losses_by_hand(tmp_path):
    """Eq. 18's non-saturating generator term (logits clamped, divided by wf as SiDA) and the psi
    update's loss, Eq. 13 + lambda_d x the discriminator's BCE on real y_t / fake x_t (-Eq. 17 / 2),
    recomputed here from the same draws."""
    torch.manual_seed(0)
    model = omiad.Model(tiny_cfg(tmp_path))
    cfg, x0, psi = model.cfg, torch.randn(4, 48, 8, 8), copy.deepcopy(model.teacher).requires_grad_(True)
    torch.nn.init.normal_(psi.out[-1].weight, std=0.05)
    x_g = model.generate(model.generator, x0, torch.randn(x0.shape, generator=common.generator(0, 0)), cfg['t_init'])
    _, _, l_adv = omiad.generator_loss(model, psi, x_g, common.generator(0, 1), cfg, use_adv=True)
    loss = omiad.psi_update(model, psi, torch.optim.Adam(psi.parameters()), x0, x_g.detach(),
                            common.generator(0, 1), cfg)[0]
    g = common.generator(0, 1)                            # the draws both functions made from it
    t, eps = torch.randint(0, cfg['t_max'] + 1, (4,), generator=g), torch.randn(x0.shape, generator=g)
    a = model.abar[t].view(-1, 1, 1, 1)
    x_t, y_t = a.sqrt() * x_g + (1 - a).sqrt() * eps, a.sqrt() * x0 + (1 - a).sqrt() * eps
    with torch.no_grad():
        eps_phi, (eps_psi, d_fake), d_real = model.teacher(x_t, t), psi(x_t, t, logits=True), psi.disc(y_t, t)
        wf = (((1 - a) / a).sqrt() * (eps - eps_phi)).abs().mean((1, 2, 3))
        c = cfg['logit_clamp']
        want_adv = (F.softplus(-d_fake.clamp(-c, c)).flatten(1).mean(1) / wf).mean()     # -log D(x_t)
        want_psi = F.mse_loss(eps_psi, eps) + cfg['lambda_d'] * 0.5 * (
            F.softplus(-d_real).mean() + F.softplus(d_fake).mean())                       # -log D(y) - log(1 - D(x))
    torch.testing.assert_close(l_adv, want_adv, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss.detach(), want_psi, rtol=1e-5, atol=1e-7)


def test_teacher_ddim_by_hand_and_its_calls(tmp_path):
    """--use_teacher --teacher_steps K: K teacher calls at t_init, ..., t_init / K; K = 2 equals two
    deterministic DDIM steps (eta = 0) computed here."""
    torch.manual_seed(0)
    model = omiad.Model(dict(tiny_cfg(tmp_path), t_init=100, teacher_steps=2)).eval()
    torch.nn.init.normal_(model.teacher.out[-1].weight, std=0.05)
    x0, eps, a = torch.randn(2, 48, 8, 8), torch.randn(2, 48, 8, 8), model.abar
    calls = []
    hook = model.teacher.register_forward_hook(lambda net, args, out: calls.append(int(args[1][0])))
    with torch.no_grad():
        got = model.ddim(x0, eps)
        model.cfg['teacher_steps'] = 3
        model.ddim(x0, eps)
        hook.remove()
        x = a[100].sqrt() * x0 + (1 - a[100]).sqrt() * eps
        e = model.teacher(x, torch.full((2,), 100))
        x = a[50].sqrt() * (x - (1 - a[100]).sqrt() * e) / a[100].sqrt() + (1 - a[50]).sqrt() * e
        e = model.teacher(x, torch.full((2,), 50))
        want = (x - (1 - a[50]).sqrt() * e) / a[50].sqrt()
    assert calls == [100, 50, 100, 67, 33]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_distillation_starts_from_the_teacher(run):
    """Alg. 1 line 2 (theta <- phi) in the training run itself: the first stage-2 checkpoint holds a
    generator equal to the trained teacher."""
    first = next(p for p in run[2] if p.endswith('stage2_step0'))
    weights = common.read_checkpoint(first)['model']
    gen, teacher = ({k.split('.', 1)[1]: v for k, v in weights.items() if k.startswith(f'{net}.')}
                    for net in ('generator', 'teacher'))
    assert gen.keys() == teacher.keys() and all(torch.equal(gen[k], teacher[k]) for k in gen)
    assert teacher['out.2.weight'].abs().max() > 0      # a trained teacher: its output conv starts at zero


def test_predict_shapes_and_nfe(run):
    model = run[0]
    out = model.predict(batch(3))
    assert out['map'].shape == (3, 64, 64) and out['score'].shape == (3,)
    assert out['nfe'] == {'unet': 1} and (out['map'] >= 0).all() and torch.isfinite(out['score']).all()
    teacher = omiad.Model(dict(model.cfg, use_teacher=True, teacher_steps=3))
    teacher.load_state_dict(model.state_dict())
    assert teacher.eval().predict(batch(3))['nfe'] == {'unet': 3}


def test_generator_with_the_teachers_weights_is_the_one_step_teacher(run):
    """Alg. 1 line 2 (theta <- phi): with the teacher's weights (as before ASD; the training run's own
    copy: test_distillation_starts_from_the_teacher), g == the teacher's DDIM with one step."""
    model = run[0]
    one_step = omiad.Model(dict(model.cfg, use_teacher=True, teacher_steps=1))
    one_step.load_state_dict(model.state_dict())
    one_step.generator.load_state_dict(one_step.teacher.state_dict())
    student = copy.deepcopy(one_step)
    student.cfg = dict(one_step.cfg, use_teacher=False)
    a, b = one_step.eval().predict(batch(2)), student.eval().predict(batch(2))
    assert torch.allclose(a['map'], b['map'], rtol=1e-5) and not torch.allclose(
        a['map'], model.predict(batch(2))['map'], rtol=1e-5)   # ... and ASD moved it


def test_score_is_the_max_of_the_box_averaged_map(run):
    """UniAD's image score: max over positions of the k x k mean of the map, k = 16 at 224 px scaled
    with the image (64 px here: k = 5)."""
    out = run[0].predict(batch(3))
    boxes = F.avg_pool2d(out['map'][:, None].double(), 5, stride=1)
    assert torch.allclose(out['score'].double(), boxes.flatten(1).amax(1), rtol=1e-6)
    assert (out['score'] < out['map'].flatten(1).amax(1)).all()      # an average, not the peak
    wide = omiad.Model(dict(run[0].cfg, score_kernel=10 ** 4))          # a kernel past the map: its mean
    wide.load_state_dict(run[0].state_dict())
    torch.testing.assert_close(wide.eval().predict(batch(3))['score'], out['map'].flatten(1).mean(1))


def test_batch_size_invariance(run):
    model, b = run[0], batch(6)
    whole = model.predict(b)['score']
    parts = [model.predict(dict(image=b['image'][i:j], cls=b['cls'][i:j], path=b['path'][i:j]))['score']
             for i, j in ((0, 1), (1, 4), (4, 6))]
    assert torch.allclose(whole, torch.cat(parts), rtol=1e-5, atol=1e-6)


def test_identical_predictions_after_save_load_in_a_fresh_process(run, tmp_path):
    model, out, _ = run
    torch.save(batch(4), tmp_path / 'batch.pt')
    code = ("import torch, common, omiad; m, _ = common.load(%r, omiad.Model); "
            "torch.save(m.predict(torch.load(%r, weights_only=True)), %r)") % (
        str(out / 'ckpt.pt'), str(tmp_path / 'batch.pt'), str(tmp_path / 'pred.pt'))
    subprocess.run([sys.executable, '-c', code], check=True, cwd=os.path.dirname(omiad.__file__),
                   env=dict(os.environ, PYTHONPATH=os.path.dirname(omiad.__file__)))
    fresh, here = torch.load(tmp_path / 'pred.pt', weights_only=True), model.predict(batch(4))
    assert torch.equal(fresh['score'], here['score']) and torch.equal(fresh['map'], here['map'])


@pytest.mark.parametrize('stage', [1, 2])
def test_exact_resume_across_stages(run, tmp_path, stage):
    """Straight run == resuming from the step-2 checkpoint of stage 1 (or of stage 2)."""
    model, _, saved = run
    mid = next(p for p in saved if p.endswith(f'.stage{stage}_step2'))
    shutil.copy(mid, tmp_path / 'ckpt.pt')
    resumed, _ = omiad.train(tiny_cfg(tmp_path, '--resume'))
    for k, v in model.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    final = common.read_checkpoint(str(tmp_path / 'ckpt.pt'))
    straight = common.read_checkpoint(saved[-1])
    assert final['stage'] == 2 and final['step'] == 4
    for k, v in straight['psi'].items():
        assert torch.equal(v, final['psi'][k]), k


@pytest.mark.parametrize('stage, key', [(1, 'amdm_lr'), (2, 'asd_lr')])
def test_a_learning_rate_typed_at_resume_applies(run, tmp_path, stage, key):
    """--resume --asd_lr X prints 'resuming with asd_lr = X' and must then train at X (the optimiser's
    saved state used to bring the checkpoint's lr back, and the resumed run was the straight one)."""
    model, _, saved = run
    shutil.copy(next(p for p in saved if p.endswith(f'.stage{stage}_step2')), tmp_path / 'ckpt.pt')
    lr = 3 * omiad.config[key]
    resumed, _ = omiad.train(tiny_cfg(tmp_path, '--resume', f'--{key}', str(lr)))
    net = 'teacher' if stage == 1 else 'generator'
    before, after = getattr(model, net).state_dict(), getattr(resumed, net).state_dict()
    assert not all(torch.equal(v, after[k]) for k, v in before.items())
    final = common.read_checkpoint(str(tmp_path / 'ckpt.pt'))
    assert final['config'][key] == lr
    if stage == 2:
        assert final['opt_g']['param_groups'][0]['lr'] == final['opt_psi']['param_groups'][0]['lr'] == lr


def test_a_key_typed_at_resume_that_changes_a_buffer_is_refused(run, tmp_path):
    """The schedule abar is a buffer, loaded from the checkpoint: --beta_T typed at --resume would be
    printed and saved but not used (the saved config would then lie about the model)."""
    _, _, saved = run
    shutil.copy(next(p for p in saved if p.endswith('.stage2_step2')), tmp_path / 'ckpt.pt')
    with pytest.raises(common.UserError, match=r"keep the checkpoint's abar.*typed: --beta_T"):
        omiad.train(tiny_cfg(tmp_path, '--resume', '--beta_T', '0.03'))


def test_drift_monitor_stops_training_and_keeps_the_distilled_at_init_model(tmp_path):
    """The first check (step 2) stops; the checkpoint kept is ASD's start (stage 2, step 0: the
    generator = the EMA teacher), which evaluates, not a stage-1 one with an untrained generator."""
    with pytest.raises(common.UserError, match=r'drifted.*continue it with a lower lr \(--resume --asd_lr 1.25e-06\)'):
        omiad.train(tiny_cfg(tmp_path, '--drift_max', '0.5'))
    with pytest.warns(UserWarning, match='saved at step 0, before training ended'):   # and says so
        model, ckpt = common.load(str(tmp_path / 'ckpt.pt'), omiad.Model)
    assert (ckpt['stage'], ckpt['step']) == (2, 0)
    assert all(torch.equal(v, model.teacher.state_dict()[k]) for k, v in model.generator.state_dict().items())
    assert torch.isfinite(model.predict(batch(2))['score']).all()
    resumed, _ = omiad.train(tiny_cfg(tmp_path, '--resume', '--asd_lr', '0', '--drift_max', '1.5'))   # as it says
    assert all(torch.equal(v, resumed.generator.state_dict()[k]) for k, v in model.generator.state_dict().items())


def test_a_stage_1_checkpoint_is_refused_for_evaluation(run):
    """Saved mid-AMDM, the generator is untrained (it scored noise): common.load refuses it (FINAL_STAGE),
    while --resume still continues from it (test_exact_resume_across_stages)."""
    stage1 = next(p for p in run[2] if p.endswith('.stage1_step2'))
    with pytest.raises(common.UserError, match='saved in stage 1 of training.*finish the run with --resume'):
        common.load(stage1, omiad.Model, overrides={'use_teacher': True})
    with pytest.raises(common.UserError, match='before training ended: finish it with --resume$'):   # not: eval.py,
        common._load_finished(tiny_cfg(os.path.dirname(stage1)), stage1, omiad.Model)          # which refuses it


def test_keys_of_what_a_run_has_done_are_refused_at_resume(run, tmp_path):
    """Stage 1's keys once stage 2 runs (the teacher is trained), and the start's (the feature
    statistics) at any resume: printed and saved, they would not be used."""
    _, _, saved = run
    shutil.copy(next(p for p in saved if p.endswith('.stage2_step2')), tmp_path / 'ckpt.pt')
    with pytest.raises(common.UserError, match=r'--p_max --kappa: this run is past stage 1 \(AMDM\), the only part'):
        omiad.train(tiny_cfg(tmp_path, '--resume', '--p_max', '0.9', '--kappa', '3'))
    shutil.copy(next(p for p in saved if p.endswith('.stage1_step2')), tmp_path / 'ckpt.pt')
    with pytest.raises(common.UserError, match=r'--feat_norm: this run is past its start'):
        omiad.train(tiny_cfg(tmp_path, '--resume', '--feat_norm'))


def test_a_resumed_run_is_checked_with_its_own_values(run, tmp_path):
    """A run whose teacher trained on t <= 200: --t_max 250 at --resume would query it where it never
    trained; the check must use the run's amdm_t_max, not the preset's 299."""
    path = tmp_path / 'ckpt.pt'
    ckpt = torch.load(next(p for p in run[2] if p.endswith('.stage2_step2')), weights_only=True)
    ckpt['config'].update(amdm_t_max=200, t_max=200)
    torch.save(ckpt, path)
    with pytest.raises(common.UserError, match=r'need 0 <= --t_max <= --amdm_t_max'):
        omiad.train(tiny_cfg(tmp_path, '--resume', '--t_max', '250'))


@pytest.mark.parametrize('stage, key', [(1, 'amdm_steps'), (2, 'asd_steps')])
def test_a_stage_is_not_shortened_below_what_it_has_trained(run, tmp_path, stage, key):
    """Stage 1 at step 2 resumed with --amdm_steps 1 would go on to stage 2 while the checkpoint and
    results.json said the teacher had trained 1 step."""
    shutil.copy(next(p for p in run[2] if p.endswith(f'.stage{stage}_step2')), tmp_path / 'ckpt.pt')
    with pytest.raises(common.UserError, match=f'--{key} 1 is below the 2 steps that stage {stage} of .* at least 2'):
        omiad.train(tiny_cfg(tmp_path, '--resume', f'--{key}', '1'))


def test_cli_errors(tmp_path):
    with pytest.raises(common.UserError, match='--mask must be spatial or element'):
        omiad.train(tiny_cfg(tmp_path, '--mask', 'patch'))
    with pytest.raises(common.UserError, match='--block must be at least 1, not 0'):
        omiad.train(tiny_cfg(tmp_path, '--block', '0'))
    with pytest.raises(common.UserError, match=r'need 0 <= --t_max <= --amdm_t_max <= 999: the teacher is queried'):
        omiad.train(tiny_cfg(tmp_path, '--t_max', '300'))          # the teacher is untrained there
    with pytest.raises(common.UserError, match='did you mean --t_init'):
        tiny_cfg(tmp_path, '--t_inti', '400')
    ckpt = dict(method='omiad', config=dict(omiad.config), model={})
    with pytest.raises(common.UserError, match='cannot change without retraining'):
        common.load('ckpt.pt', omiad.Model, overrides={'ch': 8}, ckpt=ckpt)   # only INFER_KEYS may
    for overrides, message in (({'t_init': 300}, r'--t_init must lie in 0..299 \(the teacher'),
                               ({'use_teacher': True, 'teacher_steps': 0}, 'teacher_steps in 1..t_init'),
                               ({'use_teacher': True, 'teacher_steps': 500}, r'got 200 and 500')):
        with pytest.raises(common.UserError, match=message):     # inference keys, checked at every load
            omiad.Model(dict(tiny_cfg(tmp_path), **overrides))
    omiad.Model(dict(tiny_cfg(tmp_path), t_init=5))               # the generator: teacher_steps 10 unused
    for flags in (['--ch', '48'], ['--feature_size', '6'], ['--feature_size', '0']):
        with pytest.raises(common.UserError, match='multiple of 32'):
            omiad.train(tiny_cfg(tmp_path, *flags))
    for flags, message in ((['--attn_res', '16'], r"--attn_res \(16,\) matches none of the U-Net's resolutions "
                                                   r'\(8, 4, 2\); --attn_res= builds no attention'),   # a typo
                           (['--num_heads', '3'], r'--num_heads 3 must divide each attention width \(32, 64\)'),
                           (['--beta_1', '0.02', '--beta_T', '1e-4'], 'need 0 <= --beta_1 <= --beta_T < 1'),   # reversed
                           (['--p_min', '0.5', '--p_max', '0.1'], r'Eq\. 7 needs 0 <= --p_min <= --p_max <= 1'),
                           (['--kappa', '-1'], r'and --kappa >= 0'),        # 0^-1 at t = 0
                           (['--ema_decay', '1'], r'--ema_decay must lie in \[0, 1\)'),     # a frozen teacher
                           (['--val_images', '0'], '--val_images and --bn_images must be at least 1')):   # not after stage 1
        with pytest.raises(common.UserError, match=message):      # before any data is read or step is made
            omiad.train(tiny_cfg(tmp_path, *flags))
    with pytest.raises(common.UserError, match=r"--backbone pixels \(the tiny preset's\) has no weights: add --backbone"):
        omiad.train(tiny_cfg(tmp_path, '--backbone_weights', 'timm'))


def test_an_empty_validation_split_fails_before_stage_1(tmp_path):
    """The drift check of stage 2 needs the validation split: without one, stop before training."""
    with pytest.raises(common.UserError, match='val split of weave is empty'):
        omiad.train(tiny_cfg(tmp_path, '--val_frac', '0'))
    assert not os.path.exists(tmp_path / 'ckpt.pt')


def test_amdm_loss_by_hand(tmp_path):
    """Eq. 6-11 from the same draws: the MASKED x0 is noised, the x0 estimate is scored against the
    UNMASKED x0, weighted by min(SNR_t, snr_max)."""
    torch.manual_seed(0)
    model = omiad.Model(tiny_cfg(tmp_path))
    torch.nn.init.normal_(model.teacher.out[-1].weight, std=0.05)    # the zero-initialised one predicts 0
    cfg, abar = model.cfg, model.abar
    x0 = torch.randn(4, 48, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = omiad.amdm_loss(model, x0, common.generator(0, 'by hand'))
        g = common.generator(0, 'by hand')                           # the draws amdm_loss makes from it
        t = torch.randint(0, cfg['amdm_t_max'] + 1, (4,), generator=g)   # the tiny preset's 0..299
        u = torch.rand((4, 1, 8, 8), generator=g)
        p = cfg['p_min'] + (cfg['p_max'] - cfg['p_min']) * (t.float() / cfg['T']) ** cfg['kappa']
        keep = (u >= p.view(-1, 1, 1, 1)).float()                    # 1 keeps, 0 masks (Eq. 8)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * (x0 * keep) + (1 - a).sqrt() * eps
        x0_hat = (x_t - (1 - a).sqrt() * model.teacher(x_t, t)) / a.sqrt()
        gamma = torch.minimum(a / (1 - a), torch.tensor(cfg['snr_max']))
        want = (gamma * (x0_hat - x0) ** 2).mean()
    assert (keep == 0).any() and (gamma < cfg['snr_max']).any()      # both matter in this case
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_map_is_the_squared_feature_error(tmp_path):
    """Algorithm 2: S = ||x0 - x0_hat||^2 over channels, upsampled bilinearly to the input size."""
    torch.manual_seed(0)
    model = omiad.Model(tiny_cfg(tmp_path)).eval()
    torch.nn.init.normal_(model.generator.out[-1].weight, std=0.05)
    b = batch(2)
    out = model.predict(b)
    with torch.no_grad():
        x0 = model.features(b['image'])
        eps = common.sample_noise(x0.shape[1:], model.cfg['seed'], b['path'])
        S = ((x0 - model.generate(model.generator, x0, eps, model.cfg['t_init'])) ** 2).sum(1, keepdim=True)
    want = F.interpolate(S, size=(64, 64), mode='bilinear', align_corners=False)[:, 0]
    torch.testing.assert_close(out['map'], want, rtol=1e-5, atol=1e-5)


def test_the_teacher_is_the_ema(tmp_path):
    """ema_decay 0: the teacher is the trained net; ema_decay 1: it stays at its initialisation."""
    x0, unchanged = torch.randn(8, 48, 8, 8, generator=torch.Generator().manual_seed(0)), {}
    for decay in (0.0, 1.0):
        torch.manual_seed(0)
        model = omiad.Model(tiny_cfg(tmp_path / str(decay), '--amdm_steps', '2', '--ema_decay', str(decay)))
        init = copy.deepcopy(model.teacher.state_dict())
        omiad.train_amdm(model, model.cfg, None, x0, None, lambda: 0.0)
        unchanged[decay] = all(torch.equal(init[k], v) for k, v in model.teacher.state_dict().items())
    assert unchanged == {0.0: False, 1.0: True}


def asd_parts(tmp_path, **kw):
    torch.manual_seed(0)
    model = omiad.Model(dict(tiny_cfg(tmp_path), **kw))
    g, psi = model.generator.requires_grad_(True), copy.deepcopy(model.teacher).requires_grad_(True)
    opt_g, opt_psi = (torch.optim.Adam(n.parameters(), lr=1e-3, betas=(0.0, 0.999)) for n in (g, psi))
    return model, g, psi, opt_g, opt_psi


def test_psi_only_warmup_then_the_adversarial_term(tmp_path, monkeypatch):
    """Steps < psi_warmup update psi only; from psi_warmup on the generator too, with the adversarial
    term from adv_start on (steps counted from 0)."""
    model, g, psi, opt_g, opt_psi = asd_parts(tmp_path, psi_warmup=2, adv_start=4)
    seen, update = [], omiad.generator_update

    def spy(model, g, psi, opt_g, x_g, gen, cfg, use_adv):
        seen.append((step, use_adv))
        return update(model, g, psi, opt_g, x_g, gen, cfg, use_adv)
    monkeypatch.setattr(omiad, 'generator_update', spy)
    x0 = torch.randn(4, 48, 8, 8, generator=torch.Generator().manual_seed(0))
    for step in range(6):
        g0 = copy.deepcopy(g.state_dict())
        omiad.asd_step(model, g, psi, opt_g, opt_psi, x0, common.generator(0, step), step)
        moved = any(not torch.equal(v, g.state_dict()[k]) for k, v in g0.items())
        assert moved == (step >= 2), step
    assert seen == [(2, False), (3, False), (4, True), (5, True)]


def test_drift_monitor_threshold(tmp_path, monkeypatch):
    """check_drift returns generator / teacher validation error and stops above drift_max only."""
    model = omiad.Model(dict(tiny_cfg(tmp_path), drift_max=1.4))
    monkeypatch.setattr(omiad, 'val_error', lambda *a, **k: 3.0)
    assert omiad.check_drift(model, None, None, 2.5, 7) == pytest.approx(1.2)
    with pytest.raises(common.UserError, match=r'validation error is 1\.50x the teacher.*ASD step 7'):
        omiad.check_drift(model, None, None, 2.0, 7)


def test_asd_optimisers_are_sids_adam(run):
    """Generator and student score: Adam at asd_lr with betas (0, 0.999) (SiD), as saved in stage 2."""
    model, _, saved = run
    ckpt = common.read_checkpoint(next(p for p in saved if p.endswith('stage2_step0')))
    for key in ('opt_g', 'opt_psi'):
        group = ckpt[key]['param_groups'][0]
        assert group['lr'] == model.cfg['asd_lr'] and tuple(group['betas']) == (0.0, 0.999), key


def test_psi_gradients_are_value_clipped(tmp_path):
    """psi_update leaves psi's gradients clipped elementwise to +-psi_clip (SiDA)."""
    model, g, psi, _, opt_psi = asd_parts(tmp_path, psi_clip=1e-4)
    x0 = torch.randn(4, 48, 8, 8, generator=torch.Generator().manual_seed(0))
    x_g = model.generate(g, x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)), 400).detach()
    omiad.psi_update(model, psi, opt_psi, x0, x_g, common.generator(0, 1), model.cfg)
    grads = torch.cat([p.grad.flatten() for p in psi.parameters() if p.grad is not None])
    assert grads.abs().max().item() == pytest.approx(1e-4)


def test_teacher_gradient_norm_is_clipped(tmp_path):
    """Stage 1 clips the teacher's gradient norm to grad_clip: at 1e-12 Adam's first step is ~1e-4 lr
    (eps dominates), at 1.0 it is ~lr (ema_decay 0: the teacher is the trained net)."""
    x0 = torch.randn(8, 48, 8, 8, generator=torch.Generator().manual_seed(0))
    moved = {}
    for clip in (1e-12, 1.0):
        torch.manual_seed(0)
        model = omiad.Model(tiny_cfg(tmp_path / str(clip), '--amdm_steps', '1', '--ema_decay', '0',
                                     '--grad_clip', str(clip)))
        init = copy.deepcopy(model.teacher.state_dict())
        omiad.train_amdm(model, model.cfg, None, x0, None, lambda: 0.0)
        moved[clip] = max((v - init[k]).abs().max().item() for k, v in model.teacher.state_dict().items())
    lr = omiad.config['amdm_lr']
    assert moved[1e-12] < 1e-3 * lr and moved[1.0] > 0.5 * lr


def test_t_init_is_an_inference_key(run, tmp_path):
    """eval.py --t_init: loading with the override changes the noise level predict uses."""
    model, out, _ = run
    path = str(out / 'ckpt.pt')
    other, _ = common.load(path, omiad.Model, overrides={'t_init': 100})
    assert other.cfg['t_init'] == 100
    b = batch(2)
    want = copy.deepcopy(model)
    want.cfg = dict(model.cfg, t_init=100)
    torch.testing.assert_close(other.predict(b)['map'], want.predict(b)['map'])
    assert not torch.allclose(other.predict(b)['map'], model.predict(b)['map'])


def test_a_checkpoint_from_before_amdm_t_max_keeps_its_teacher_on_all_t(run, tmp_path, capsys):
    """LEGACY: a checkpoint saved before amdm_t_max existed trained its teacher on every t, so it
    loads and resumes with amdm_t_max 999, not the tiny preset's 299 (which would refuse its t_max 990
    and --t_init above 299, and resume stage 1 on other timesteps)."""
    _, out, _ = run
    c = common.read_checkpoint(str(out / 'ckpt.pt'))
    del c['config']['amdm_t_max']
    c['config']['t_max'] = 990                                        # the tiny preset's value then
    os.makedirs(tmp_path / 'old')
    torch.save(c, tmp_path / 'old' / 'ckpt.pt')
    model, _ = common.load(str(tmp_path / 'old' / 'ckpt.pt'), omiad.Model, overrides={'t_init': 400})
    assert model.cfg['amdm_t_max'] == 999 and 'it runs with --amdm_t_max 999' in capsys.readouterr().out
    omiad.check_config(common.resume(tiny_cfg(tmp_path / 'old', '--resume'), omiad.Model)[0].cfg)   # no error


def test_timestep_embedding_is_cos_then_sin_with_max_period_10000(sinusoids):
    t = torch.tensor([0, 1, 400, 999])
    ref = torch.cat(sinusoids(t), 1)                        # [cos, sin]
    torch.testing.assert_close(omiad.timestep_embedding(t, 8), ref, atol=1e-5, rtol=1e-5)


def test_resblock_forward_by_hand(randomise):
    torch.manual_seed(0)
    blk = randomise(omiad.ResBlock(32, 64, 16))
    x, emb = torch.randn(2, 32, 4, 4), torch.randn(2, 16)
    ref = blk.skip(x) + blk.out_layers(blk.in_layers(x) + blk.emb[1](F.silu(emb))[:, :, None, None])
    torch.testing.assert_close(blk(x, emb), ref)
    assert not torch.allclose(blk(x, emb), blk(x, emb + 1))


def test_discriminator_is_the_channel_mean_of_the_last_encoder_activation_of_a_trained_net(tmp_path, randomise):
    """With non-zero residual branches (as after training) disc = forward's d = mean_c of the encoder output."""
    net = randomise(omiad.UNet(tiny_cfg(tmp_path, '--ch_mult', '1,2,2'), 48))
    x, t = torch.randn(2, 48, 8, 8), torch.tensor([0, 700])
    hs, _ = net.encode(x, t)
    eps, d = net(x, t, logits=True)
    torch.testing.assert_close(d, hs[-1].mean(1))
    torch.testing.assert_close(net.disc(x, t), hs[-1].mean(1))


def test_attention_runs_only_at_attn_res(tmp_path):
    """attn_res=(8,) on an 8x8 grid, mults 1,2: down n_res x at 8, mid at 4, up (n_res + 1) x at 8."""
    cfg = tiny_cfg(tmp_path, '--ch_mult', '1,2', '--attn_res', '8')
    net, seen = omiad.UNet(cfg, 48), []
    for name, m in net.named_modules():
        if isinstance(m, omiad.Attention):
            m.register_forward_hook(lambda m, i, o, name=name: seen.append((name.split('.')[0], i[0].shape[-1])))
    net(torch.randn(1, 48, 8, 8), torch.tensor([9]))
    n = cfg['num_res_blocks']
    assert seen == [('down', 8)] * n + [('mid', 4)] + [('up', 8)] * (n + 1)


def test_efficientnet_stages_are_resized_with_antialias_and_concatenated_in_order(tmp_path):
    model = omiad.Model(tiny_cfg(tmp_path, '--backbone', 'efficientnet_b4', '--image_size', '64',
                                   '--feature_size', '4'))
    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    fs = model.backbone((image - model.pixel_mean) / model.pixel_std)
    ref = torch.cat([F.interpolate(f, size=(4, 4), mode='bilinear', antialias=True) for f in fs], 1)
    torch.testing.assert_close(model.features(image), ref)


def test_attention_by_hand_with_contiguous_heads(randomise):
    """q, k, v = thirds of qkv(GN x); head j = channels j*C/h .. (j+1)*C/h of each; softmax(q k^T / sqrt(d)) v."""
    torch.manual_seed(0)
    att = randomise(omiad.Attention(64, 4))
    x = torch.randn(2, 64, 3, 3)
    q, k, v = att.qkv(att.norm(x)).flatten(2).chunk(3, 1)                        # (B, C, HW) each
    heads = []
    for j in range(4):
        s = slice(16 * j, 16 * (j + 1))
        w = torch.softmax(q[:, s].transpose(1, 2) @ k[:, s] / 4.0, -1)          # (B, HW, HW)
        heads.append((w @ v[:, s].transpose(1, 2)).transpose(1, 2))              # (B, d, HW)
    ref = x + att.proj(torch.cat(heads, 1).view(2, 64, 3, 3))
    torch.testing.assert_close(att(x), ref, atol=1e-5, rtol=1e-5)


def test_bfloat16_warns_where_eq10_amplifies_its_rounding(tmp_path):
    """At t_init = 960 Eq. 10 multiplies eps's rounding by ~107: bfloat16 must be flagged there, not at
    the tiny preset's t_init (factor 0.33) and not in float32."""
    wide = ['--ch', '64', '--amdm_t_max', '999']                      # no width warning
    with pytest.warns(UserWarning, match=r'bfloat16 at t_init 960.*= 107 '):
        omiad.Model(tiny_cfg(tmp_path, *wide, '--t_init', '960', '--dtype', 'bfloat16'))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        omiad.Model(tiny_cfg(tmp_path, *wide, '--t_init', '100', '--dtype', 'bfloat16'))
        omiad.Model(tiny_cfg(tmp_path, *wide, '--t_init', '960'))
