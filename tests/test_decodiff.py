"""DeCo-Diff: schedule, masked forward process (Eq. 7, 11), deviation correction (Eq. 13-14),
anomaly map (Eq. 15), the diffusers-compatible VAE, checkpoints, exact resume across both stages."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import common
import decodiff as d

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = os.path.join(REPO, 'tests', 'decodiff_vae_manifest.json')
SMALL = ['--image_size', '32', '--category', 'weave', '--batch_size', '4', '--ae_steps', '4', '--steps', '4',
         '--ae_crop', '16', '--patch_sizes', '1,2', '--patch_probs', '0.5,0.5', '--log_interval', '100',
         '--ckpt_interval', '2', '--device', 'cpu']


def small_cfg(tmp_path, *extra):
    return common.get_config(d.config, d.PRESETS, SMALL + ['--out_dir', str(tmp_path)] + list(extra), d.__file__)


def tiny_model(**kw):
    return d.Model({**d.config, **d.PRESETS['tiny'], 'n_classes': 4, **kw}).eval()


def test_schedule_table():
    """Squared-cosine betas for T=10 (official squaredcos_cap_v2) and the derived c_t of Eq. 11."""
    betas = d.cosine_betas(10)
    assert torch.allclose(betas, torch.tensor([.0279, .0755, .1244, .1772, .2373, .3099, .4040, .5370, .7438, .999],
                                              dtype=torch.float64), atol=6e-5)
    abar = tiny_model().abar.double()
    assert torch.allclose(abar[:9], torch.tensor([.9721, .8987, .7869, .6475, .4938, .3408, .2031, .0941, .0241],
                                                 dtype=torch.float64), atol=6e-5)
    c = (1 - abar.sqrt()) / (1 - abar).sqrt()
    assert torch.allclose(c, torch.tensor([.0841, .1634, .2446, .3290, .4178, .5126, .6153, .7284, .8551, .9951],
                                          dtype=torch.float64), atol=6e-5)
    assert d.respaced(10, 5) == [0, 2, 4, 6, 8] and d.respaced(10, 3) == [0, 4, 8]
    assert d.respaced(10, 2) == [0, 5] and d.respaced(10, 10) == list(range(10))
    with pytest.raises(common.UserError, match='reverse steps'):
        d.respaced(10, 1)


def test_eta_is_exactly_zero_on_visible_patches():
    """Eq. 7 and 11: visible patches are untouched and their target is exactly 0; on noised
    patches z_t = z0 + sqrt(1 - abar) eta (the deviation form of Eq. 10)."""
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(8, 4, 16, 16, generator=g), torch.randn(8, 4, 16, 16, generator=g)
    m = d.random_patch_mask(torch.rand(8, generator=g) * 0.7, 16, 2, g)
    t = torch.arange(8)
    abar = tiny_model().abar
    zt, eta = d.forward_process(z0, t, m, noise, abar)
    vis = m.expand_as(z0).bool()
    assert (eta[vis] == 0).all() and torch.equal(zt[vis], z0[vis])
    a = abar[t].view(-1, 1, 1, 1).expand_as(z0)
    assert torch.allclose(zt[~vis], (z0 + (1 - a).sqrt() * eta)[~vis], atol=1e-5)


def test_zero_output_model_leaves_the_latent_unchanged():
    """The U-Net's output conv is zero-initialised: eta = 0, so deviation correction is the identity
    for both strategies and every S, and the anomaly map is all zeros."""
    model = tiny_model()
    z = torch.randn(2, 4, 16, 16)
    for strategy in ('z_prev', 'z0'):
        for S in (2, 5, 10):
            model.cfg.update(strategy=strategy, S=S)
            assert torch.equal(model.correct(z, torch.zeros(2, dtype=torch.long)), z)
    out = model.predict(dict(image=torch.rand(2, 3, 128, 128), cls=torch.zeros(2, dtype=torch.long), path=['a', 'b']))
    assert (out['map'] == 0).all() and (out['score'] == 0).all()


class ConstantEta(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []                      # the timesteps it is called with

    def forward(self, z, t, cls=None):
        self.seen.append(t.tolist())
        return torch.full_like(z, 0.5)


def test_correction_steps_follow_eq_13_14():
    """With a constant eta e, Eq. 14 telescopes to z - sqrt(1 - abar_{t_S}) e; the z~0 strategy
    (Table 3) subtracts sqrt(1 - abar_t) e at every visited t."""
    model = tiny_model()
    model.unet = ConstantEta()
    z, s = torch.randn(1, 4, 8, 8), (1 - model.abar).sqrt()
    model.cfg.update(S=5, strategy='z_prev')
    assert torch.allclose(model.correct(z, None), z - s[8] * 0.5, atol=1e-6)
    assert model.unet.seen == [[8], [6], [4], [2], [0]]      # t_S > ... > t_1, each t as it is
    model.cfg.update(strategy='z0')
    assert torch.allclose(model.correct(z, None), z - s[[0, 2, 4, 6, 8]].sum() * 0.5, atol=1e-6)


def test_mask_ratio_statistics():
    """floor(n (1 - r)) patches stay visible (the official random_mask), constant over p x p
    blocks; with r ~ U[0, 0.7] the noised share averages 0.35."""
    g = torch.Generator().manual_seed(0)
    ratio = torch.tensor([0.0, 0.1, 0.35, 0.7])
    for p in (1, 2, 4, 8):
        m = d.random_patch_mask(ratio, 16, p, g)
        n = (16 // p) ** 2
        blocks = m[:, 0, ::p, ::p]
        assert torch.equal(m, blocks.repeat_interleave(p, 1).repeat_interleave(p, 2)[:, None])
        assert blocks.flatten(1).sum(1).tolist() == torch.floor(n * (1 - ratio)).tolist()
    m = d.random_patch_mask(torch.rand(4000, generator=g) * 0.7, 16, 1, g)
    assert abs((1 - m).mean().item() - 0.35) < 0.01
    assert set(m.unique().tolist()) == {0.0, 1.0}


def test_patch_shuffling_is_a_permutation():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 16, 16, generator=g)
    for p in (1, 2, 4):
        out = d.shuffle_patches(z, p, g)
        rows = lambda x: torch.nn.functional.unfold(x, p, stride=p).transpose(1, 2).reshape(-1, 4 * p * p)
        a, b = rows(z), rows(out)
        assert not torch.equal(a, b)
        key = torch.randn(4 * p * p, dtype=torch.float64, generator=g)
        assert torch.equal(a[(a.double() @ key).argsort()], b[(b.double() @ key).argsort()])


def test_vae_matches_the_diffusers_manifest():
    """decodiff.AutoencoderKL with the sd-vae-ft-ema config has exactly diffusers' keys and shapes."""
    manifest = json.load(open(MANIFEST))
    assert manifest['config']['block_out_channels'] == list(d.SD_VAE['channels'])
    assert manifest['config']['layers_per_block'] == d.SD_VAE['layers']
    assert manifest['scaling_factor'] == d.SD_VAE['scale']
    with torch.device('meta'):
        vae = d.AutoencoderKL(d.SD_VAE['channels'], d.SD_VAE['layers'])
    ours = {k: list(v.shape) for k, v in vae.state_dict().items()}
    assert ours == manifest['keys']
    assert sum(v.numel() for v in vae.state_dict().values()) == manifest['params']


def test_vae_weights_load_with_either_attention_naming(tmp_path):
    pytest.importorskip('safetensors')
    from safetensors.torch import save_file
    src = d.AutoencoderKL((8, 16), 1)
    state = {k: torch.randn_like(v) for k, v in src.state_dict().items()}
    old = {k.replace('.to_q.', '.query.').replace('.to_k.', '.key.').replace('.to_v.', '.value.')
           .replace('.to_out.0.', '.proj_attn.'): v for k, v in state.items()}
    assert old.keys() != state.keys()
    save_file(state, str(tmp_path / 'new.safetensors'))
    os.makedirs(tmp_path / 'folder' / 'vae')
    torch.save(old, tmp_path / 'folder' / 'vae' / 'diffusion_pytorch_model.bin')
    for path in (tmp_path / 'new.safetensors', tmp_path / 'folder'):
        vae = d.AutoencoderKL((8, 16), 1)
        record = d.load_vae_weights(vae, str(path))
        assert all(torch.equal(vae.state_dict()[k], v) for k, v in state.items()) and len(record['sha256']) == 64
    with pytest.raises(common.UserError, match='not an sd-vae-ft-ema'):
        d.load_vae_weights(d.AutoencoderKL((8, 32), 1), str(tmp_path / 'new.safetensors'))
    with pytest.raises(common.UserError, match='no VAE weights'):
        d.load_vae_weights(d.AutoencoderKL((8, 16), 1), str(tmp_path / 'missing'))


def diffusers_layout_weights(vae, seed=0):
    """Weights that depend only on the (diffusers) key names and shapes, not on how the modules are built:
    each tensor in key order, ~1/sqrt(fan-in) for weights, 1 + 0.1 N for norm scales, 0.1 N for biases."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in sorted(vae.state_dict().items()):
        r = torch.randn(v.shape, generator=g)
        state[k] = r / math.sqrt(v[0].numel()) if v.dim() > 1 else (1 + 0.1 * r if 'norm' in k else 0.1 * r)
    vae.load_state_dict(state)
    return vae


def test_vae_numerically_matches_diffusers():
    """The same weights give diffusers' posterior and decoding. tests/decodiff_vae_diffusers_ref.pt holds
    diffusers 0.42.1's outputs: AutoencoderKL(block_out_channels=[128, 128], layers_per_block=1,
    norm_num_groups=32, 2 x DownEncoderBlock2D / UpDecoderBlock2D) loaded with these weights, x and z below."""
    ours = diffusers_layout_weights(d.AutoencoderKL((128, 128), 1))   # widths >= 128: 32 groups, as the SD VAE
    g = torch.Generator().manual_seed(1)
    x, z = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1, torch.randn(1, 4, 16, 16, generator=g)
    ref = torch.load(os.path.join(os.path.dirname(__file__), 'decodiff_vae_diffusers_ref.pt'), weights_only=True)
    with torch.no_grad():
        mean, logvar = ours.encode(x)
        torch.testing.assert_close(mean, ref['mean'], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logvar, ref['logvar'], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.decode(z), ref['decoded'], atol=1e-4, rtol=1e-4)


def test_map_is_on_the_minus1_1_scale_whichever_input_range():
    """predict takes [0,1] images and the autoencoder sees [-1,1]: its map equals the Eq. 15 map of
    the [-1,1] decoded pair, and gamma_p applies to [-1,1] differences (0.2 in [0,1] units = 0.4)."""
    torch.manual_seed(0)
    model = tiny_model(sigma_pix=0.0, sigma_lat=0.0)
    torch.nn.init.normal_(model.unet.out[-1].weight, std=0.05)
    x, cls = torch.rand(2, 3, 128, 128), torch.zeros(2, dtype=torch.long)
    out = model.predict(dict(image=x, cls=cls, path=['a', 'b']))
    with torch.no_grad():
        z0 = model.scale * model.vae.encode(2 * x - 1)[0]
        z_rec = model.correct(z0, cls)
        amap = model.anomaly_map(model.decode(z_rec), model.decode(z0), z_rec, z0)[0]
    assert out['map'].abs().max() > 0 and torch.allclose(out['map'], amap, atol=1e-6)
    x01 = torch.rand(1, 3, 8, 8) * 0.6
    shift = torch.tensor([0.05, 0.1, 0.2, 0.3]).repeat_interleave(2).view(1, 1, 1, 8)   # in [0,1] units
    to_ae = lambda y: 2 * y - 1
    z = torch.zeros(1, 4, 1, 1)
    d_pix = model.anomaly_map(to_ae(x01 + shift), to_ae(x01), z + 1, z)[1][0, 0]
    assert torch.allclose(d_pix, torch.tensor([0.25] * 2 + [0.5] * 2 + [1.0] * 4), atol=1e-5)
    z_rec = z + model.cfg['gamma_l'] * torch.tensor([0.1, 0.2, 0.3, 0.4]).view(1, 4, 1, 1)
    amap, d_pix, d_lat = model.anomaly_map(to_ae(x01 + shift), to_ae(x01), z_rec, z)
    assert torch.allclose(d_lat, torch.full_like(d_lat, 0.25), atol=1e-6)   # channel mean / gamma_l
    assert torch.allclose(amap, (d_pix * 0.25).sqrt(), atol=1e-6)          # Eq. 15: the geometric mean
    model.cfg['sigma_map'] = 256 / 8                   # then blurred: sigma_map px at 256 px = 1 px at 8 px
    blurred = model.anomaly_map(to_ae(x01 + shift), to_ae(x01), z_rec, z)[0]
    assert torch.allclose(blurred, common.gaussian_blur(amap[:, None], 1.0)[:, 0], atol=1e-6)
    assert not torch.allclose(blurred, amap, atol=1e-3)


def test_the_autoencoder_runs_16_images_at_a_time():
    """A batch of 20 (the paper's evaluation batch is 128) reaches the VAE in chunks of at most 16,
    with the same map as image by image."""
    torch.manual_seed(0)
    model = tiny_model(image_size=32)
    seen = []
    for net in (model.vae.encoder, model.vae.decoder):
        net.register_forward_hook(lambda m, args, out: seen.append(len(args[0])))
    x, cls = torch.rand(20, 3, 32, 32), torch.zeros(20, dtype=torch.long)
    with torch.no_grad():
        out = model.predict(dict(image=x, cls=cls, path=[str(i) for i in range(20)]))
        assert seen == [16, 4] * 3                                        # encoder once, decoder twice
        one = model.predict(dict(image=x[17:18], cls=cls[:1], path=['17']))
    torch.testing.assert_close(out['map'][17:18], one['map'], atol=1e-5, rtol=1e-4)


def test_training_reduces_the_corrector_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = tiny_model().train()
    cfg = dict(model.cfg, patch_sizes=(1, 2), patch_probs=(0.5, 0.5))
    batch = dict(mean=torch.randn(8, 4, 16, 16), std=torch.full((8, 4, 16, 16), 0.05),
                 cls=torch.zeros(8, dtype=torch.long))
    opt = torch.optim.AdamW(model.unet.parameters(), lr=1e-3)
    losses = []
    for step in range(30):
        loss = d.corrector_loss(model, batch, torch.Generator().manual_seed(0), cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_training_reduces_the_autoencoder_loss_on_a_fixed_batch():
    """Stage 1's loss (L1 + ae_kl x KL of the small autoencoder), one fixed batch, crop and noise."""
    torch.manual_seed(0)
    model = tiny_model(image_size=32).train()
    model.vae.requires_grad_(True)                     # frozen in the model; stage 1 trains it
    batch = dict(image=torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    opt = torch.optim.AdamW(model.vae.parameters(), lr=1e-3)
    losses = []
    for step in range(30):
        loss = d.autoencoder_loss(model, batch, torch.Generator().manual_seed(0), model.cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_paper_schedule_follows_the_papers_epochs():
    cfg = dict(d.config, batch_size=128)                   # Sec. 5.1: 800 epochs on MVTec, 200 on VisA
    assert d.corrector_schedule(dict(cfg, data='mvtec'), 3267) == (20419, 256)    # 10-epoch warm-up
    assert d.corrector_schedule(dict(cfg, data='visa'), 8659) == (13530, 677)
    assert d.corrector_schedule(dict(cfg, data='btad', epochs=5), 256) == (10, 20)
    assert d.corrector_schedule(dict(cfg, steps=7, warmup_steps=2), 100) == (7, 2)


def test_visa_trains_on_all_of_train_good_as_the_official_split(tmp_path):
    """The official VisA (1cls) run trains on every train/good image; MVTec holds 10% out, as here."""
    from PIL import Image
    for split, kind, n in (('train', 'good', 10), ('test', 'good', 1)):
        os.makedirs(tmp_path / 'visa' / 'candle' / split / kind)
        for i in range(n):
            Image.new('RGB', (32, 32), (i, 90, 90)).save(tmp_path / 'visa' / 'candle' / split / kind / f'{i:03}.JPG')
    visa = ('--data', 'visa', '--data_root', str(tmp_path / 'visa'), '--category', 'candle', '--preset', 'tiny')
    model, _, data, _ = d.setup(small_cfg(tmp_path / 'out', *visa))
    assert len(data) == 10 and model.cfg['val_frac'] == 0
    model, _, data, _ = d.setup(small_cfg(tmp_path / 'out', *visa, '--val_frac', '0.2'))
    assert len(data) == 8 and model.cfg['val_frac'] == 0.2          # typed: kept


def test_paper_size_xs_parameter_count():
    """The official UNet-XS (class-conditioned) has 24.7 M parameters (L: 395.0 M, see --help)."""
    unet = d.UNet({**d.config, 'ch': 64, 'head_dim': 16, 'class_cond': True, 'n_classes': 15})
    assert abs(sum(p.numel() for p in unet.parameters()) / 1e6 - 24.7) < 0.1


def test_predictions_identical_after_save_load_in_a_fresh_process(tmp_path):
    cfg = small_cfg(tmp_path)
    model, _ = d.train(cfg)
    assert model.scale.item() != 1.0
    test = common.load_dataset(model.cfg, 'test')
    idx = [0, 50, 60, 70]
    batch = dict(image=torch.stack([test[i]['image'] for i in idx]), cls=test.cls[idx],
                 path=[test.paths[i] for i in idx])
    torch.save(batch, tmp_path / 'batch.pt')
    out = model.predict(batch)
    assert out['map'].shape == (4, 32, 32) and out['score'].shape == (4,) and out['recon'].shape == (4, 3, 32, 32)
    assert 0 <= out['map'].min() and out['map'].max() <= 1 and out['nfe']['unet'] == 5
    assert model.unet.out[-1].weight.abs().max() > 0 and out['map'].max() > 0   # trained: not zeros vs zeros
    parts = [model.predict(dict(image=batch['image'][s], cls=batch['cls'][s], path=batch['path'][s]))
             for s in (slice(0, 1), slice(1, 4))]
    for k in ('map', 'score'):   # batch-size invariant up to the float rounding of batched convolutions,
        a, b = torch.cat([p[k] for p in parts]), out[k]   # which |z~0 - z0| amplifies by cancellation
        assert (a - b).abs().max() <= 1e-2 * b.abs().max()   # a real cross-sample leak is O(1)
    code = ('import torch, common, decodiff\n'
            f"model, _ = common.load({str(tmp_path / 'ckpt.pt')!r}, decodiff.Model)\n"
            f"out = model.predict(torch.load({str(tmp_path / 'batch.pt')!r}, weights_only=True))\n"
            f"torch.save({{k: out[k] for k in ('map', 'score', 'recon')}}, {str(tmp_path / 'out.pt')!r})\n")
    subprocess.run([sys.executable, '-c', code], cwd=REPO, check=True, env=dict(os.environ, PYTHONPATH=REPO))
    fresh = torch.load(tmp_path / 'out.pt', weights_only=True)
    assert all(torch.equal(fresh[k], out[k]) for k in ('map', 'score', 'recon'))


def test_exact_resume_across_both_stages(tmp_path, monkeypatch):
    """Interrupted in the autoencoder stage or in the corrector stage, --resume ends with the same
    weights as the uninterrupted run (dropout on, to include its randomness). The autoencoder
    stage draws batches of ae_batch_size, the corrector batches of batch_size."""
    save, ae_loss, sizes = common.save, d.autoencoder_loss, []

    def save_and_keep(path, model, **state):
        save(path, model, **state)
        shutil.copy(path, f"{path}.{state['stage']}{state['step']}")

    def ae_loss_spy(model, batch, gen, cfg):
        sizes.append(len(batch['image']))
        return ae_loss(model, batch, gen, cfg)
    monkeypatch.setattr(common, 'save', save_and_keep)
    monkeypatch.setattr(d, 'autoencoder_loss', ae_loss_spy)
    args = ('--dropout', '0.2', '--ae_batch_size', '2')
    straight, _ = d.train(small_cfg(tmp_path / 'a', *args))
    assert sizes == [2] * 4 and straight.cfg['batch_size'] == 4
    for copy in ('ae2', 'diffusion2'):
        os.makedirs(tmp_path / copy)
        shutil.copy(tmp_path / 'a' / f'ckpt.pt.{copy}', tmp_path / copy / 'ckpt.pt')
        resumed, _ = d.train(small_cfg(tmp_path / copy, *args, '--resume'))
        a, b = straight.state_dict(), resumed.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), copy
    shutil.copy(tmp_path / 'a' / 'ckpt.pt.diffusion2', tmp_path / 'diffusion2' / 'ckpt.pt')   # in the corrector
    for flags, message in ((['--ae_lr', '1e-4'], "--ae_lr: this run is past the autoencoder's stage"),
                           (['--epochs', '3'], r"--epochs: this run is past the corrector's start.*\(type --steps\)"),
                           (['--vae_weights', 'sd.safetensors'], '--vae_weights: this run is past its start')):
        with pytest.raises(common.UserError, match=message):    # printed and saved, they would not be used
            d.train(small_cfg(tmp_path / 'diffusion2', *args, '--resume', *flags))


def test_clear_errors_for_user_mistakes(tmp_path, monkeypatch):
    for key, value in (('gamma_l', 0.0), ('sigma_map', -1.0)):    # a division by 0; a blur that is none
        with pytest.raises(common.UserError, match='--gamma_p and --gamma_l must be > 0'):
            tiny_model(**{key: value})
    with pytest.raises(common.UserError, match='vae_weights'):
        d.train(small_cfg(tmp_path, '--vae', 'sd'))
    with pytest.raises(common.UserError, match='reverse steps'):
        d.train(small_cfg(tmp_path, '--S', '7'))
    with pytest.raises(common.UserError, match=r'--T must be at least 2 \(got 1\)'):     # not "choose one of []"
        d.respaced(1, 5)
    with pytest.raises(common.UserError, match='must divide the latent size'):
        d.train(small_cfg(tmp_path, '--patch_sizes', '1,16'))
    with pytest.raises(common.UserError, match='must divide the latent size'):
        d.train(small_cfg(tmp_path, '--patch_sizes', '0,2'))                 # not a modulo by zero
    for kw, message in ((dict(attn_ds=(8,)), r"--attn_ds \(8,\) matches none of the U-Net's downsample factors "
                                             r'\(1, 2, 4\); --attn_ds= builds no attention'),      # a typo
                        (dict(head_dim=7), r'--head_dim 7: each attention width \(64, 64\) needs at least one head, '
                                           'and width // head_dim heads of equal size'),   # 9 heads of 64 channels
                        (dict(head_dim=0), '--head_dim 0'),
                        (dict(dropout=1.0), r'--dropout must lie in \[0, 1\) \(got 1\.0\)'),
                        (dict(ch=6, head_dim=2), r'--ch 6 --ch_mult \(1, 2, 2\) .*: num_channels \(18\) must be '
                                                 'divisible by num_groups'),
                        (dict(ae_channels=(16, 32, 144)), r'--ae_channels \(16, 32, 144\): num_channels \(144\)')):
        with pytest.raises(common.UserError, match=message):
            tiny_model(**kw)
    assert tiny_model(attn_ds=(), ch=20).unet          # no attention but the middle's; 40 // 16 = 2 heads of 20
    with pytest.raises(common.UserError, match="--strategy 'bogus': z_prev or z0"):
        tiny_model(strategy='bogus')                              # when built, not after training
    for flags in (['--ae_crop', '30'], ['--ae_res_blocks', '0'], ['--ae_channels='], ['--image_size', '130']):
        with pytest.raises(common.UserError, match=r"must be multiples of the autoencoder's downsampling"):
            d.train(small_cfg(tmp_path, *flags))                  # not a shape error at the first step
    with pytest.raises(common.UserError, match=r'weights >= 0, not all 0'):
        d.train(small_cfg(tmp_path, '--patch_probs', '0,0,0'))    # not torch.multinomial's traceback
    monkeypatch.setattr(common, 'rank_world', lambda: (0, 3))    # as if under torchrun with 3 ranks
    with pytest.raises(common.UserError, match='--ae_batch_size 2 must be divisible by the 3 ranks'):
        d.train(small_cfg(tmp_path, '--ae_batch_size', '2'))


def test_pixel_term_is_the_max_over_rgb_blurred_at_the_image_scale():
    """Eq. 15's pixel term: max over RGB of |x_rec - x0| / gamma_p (clipped at 1), blurred with
    sigma_pix given at 256 px, so 3 * 64/256 px at 64 px."""
    x0, z = torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 1, 1)
    x_rec = x0.clone()
    x_rec[:, 0] = 0.2                                    # only the red channel deviates: 0.2 / 0.4
    d_pix = tiny_model(sigma_pix=0.0, sigma_lat=0.0, sigma_map=0.0).anomaly_map(x_rec, x0, z + 1, z)[1]
    torch.testing.assert_close(d_pix, torch.full((1, 4, 4), 0.5))
    g = torch.Generator().manual_seed(0)
    x0, x_rec = torch.rand(1, 3, 64, 64, generator=g), torch.rand(1, 3, 64, 64, generator=g)
    model, z = tiny_model(sigma_pix=3.0, sigma_lat=0.0, sigma_map=0.0), torch.zeros(1, 4, 16, 16)
    raw = (x_rec - x0).abs().amax(1, keepdim=True).clamp(max=0.4) / 0.4
    torch.testing.assert_close(model.anomaly_map(x_rec, x0, z + 1, z)[1],
                               common.gaussian_blur(raw, 3.0 * 64 / 256)[:, 0], atol=1e-6, rtol=0)


def test_small_autoencoder_latents_are_scaled_to_unit_variance():
    model = tiny_model(image_size=32)
    images = (torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    data = torch.utils.data.TensorDataset(images)       # encode_dataset reads its len, .images and .cls
    data.images, data.cls = images, torch.zeros(6, dtype=torch.long)
    with torch.no_grad():
        raw = model.vae.encode(images.float() / 255 * 2 - 1)[0]
        latents = d.encode_dataset(model, data, dict(model.cfg, device='cpu'))
    assert abs(raw.std().item() - 1) > 0.05                          # a case where the scale matters
    assert latents.mean.std().item() == pytest.approx(1.0, rel=1e-4)
    assert model.scale.item() == pytest.approx(1 / raw.std().item(), rel=1e-4)


def test_the_latent_scale_cancels_in_decode_of_encode():
    model = tiny_model(image_size=32)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.decode(model.encode(x)[0])
        model.scale.fill_(2.5)
        torch.testing.assert_close(model.decode(model.encode(x)[0]), ref, atol=1e-5, rtol=1e-5)


def test_corrector_loss_by_hand():
    """Eq. 7, 11, 12 from the draws corrector_loss makes: masked patches stay z0, the others are
    noised with mostly Gaussian (<= r_shuffle shuffled) noise, eta is the target on them only."""
    torch.manual_seed(0)
    model = tiny_model().train()
    torch.nn.init.normal_(model.unet.out[-1].weight, std=0.05)
    cfg = dict(model.cfg, patch_sizes=(2,), patch_probs=(1.0,))
    mean, std = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.full((4, 4, 8, 8), 0.05)
    batch = dict(mean=mean, std=std, cls=torch.zeros(4, dtype=torch.long))
    with torch.no_grad():
        got = d.corrector_loss(model, batch, torch.Generator().manual_seed(0), cfg)
        g = torch.Generator().manual_seed(0)
        z0 = mean + std * torch.randn(mean.shape, generator=g)
        t = torch.randint(0, cfg['T'], (4,), generator=g)
        torch.multinomial(torch.tensor(cfg['patch_probs']), 1, generator=g)
        m = d.random_patch_mask(torch.rand(4, generator=g) * cfg['r_mask'], 8, 2, g)
        gauss = d.random_patch_mask(torch.rand(4, generator=g) * cfg['r_shuffle'], 8, 2, g)
        eps = torch.randn(mean.shape, generator=g)
        noise = gauss * eps + (1 - gauss) * d.shuffle_patches(z0, 2, g)
        a = model.abar[t].view(-1, 1, 1, 1)
        zt = m * z0 + (1 - m) * (a.sqrt() * z0 + (1 - a).sqrt() * noise)
        eta = (1 - m) * (noise - (1 - a.sqrt()) / (1 - a).sqrt() * z0)
        want = F.mse_loss(model.unet(zt, t, batch['cls']), eta)
    assert (1 - gauss).mean() < 0.3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_autoencoder_loss_by_hand():
    """Stage 1: L1 of the decoded posterior sample + ae_kl * KL(N(mean, var) || N(0, I)), each summed
    per image, over the pixel count, on one random crop of the [-1, 1] image."""
    torch.manual_seed(0)
    model = tiny_model().train()
    cfg = dict(model.cfg, ae_crop=16, ae_kl=0.5)    # a large KL weight: its sign and size both show
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = d.autoencoder_loss(model, dict(image=x), torch.Generator().manual_seed(0), cfg)
        g = torch.Generator().manual_seed(0)
        i, j = torch.randint(0, 17, (2,), generator=g).tolist()
        crop = x[..., i:i + 16, j:j + 16] * 2 - 1
        mean, logvar = model.vae.encode(crop)
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=g)
        var = logvar.exp()
        kl = 0.5 * (mean ** 2 + var - 1 - var.log()).flatten(1).sum(1)
        l1 = (model.vae.decode(z) - crop).abs().flatten(1).sum(1)
    assert (kl > 0).all()
    torch.testing.assert_close(got, (l1 + 0.5 * kl).mean() / (3 * 16 * 16), rtol=1e-5, atol=1e-7)


def test_score_is_the_max_of_the_map():
    torch.manual_seed(0)
    model = tiny_model(image_size=32)
    torch.nn.init.normal_(model.unet.out[-1].weight, std=0.05)
    out = model.predict(dict(image=torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
                             cls=torch.zeros(2, dtype=torch.long), path=['a', 'b']))
    assert out['map'].flatten(1).amax(1).min() > 0
    torch.testing.assert_close(out['score'], out['map'].flatten(1).amax(1))


def test_lr_warmup_then_cosine_closed_form():
    """lr (step + 1) / warmup during warm-up (lr at step warmup - 1), then cosine from lr at step warmup
    to min_lr at step `steps` (half-way at the middle)."""
    lr, min_lr, steps, warmup = 1e-3, 1e-4, 100, 10
    assert math.isclose(d.lr_at(0, steps, lr, min_lr, warmup), lr / warmup, rel_tol=1e-12)
    assert math.isclose(d.lr_at(4, steps, lr, min_lr, warmup), lr * 5 / warmup, rel_tol=1e-12)
    assert math.isclose(d.lr_at(warmup - 1, steps, lr, min_lr, warmup), lr, rel_tol=1e-12)
    assert math.isclose(d.lr_at(warmup, steps, lr, min_lr, warmup), lr, rel_tol=1e-12)
    assert math.isclose(d.lr_at(55, steps, lr, min_lr, warmup), (lr + min_lr) / 2, rel_tol=1e-12)
    assert math.isclose(d.lr_at(steps, steps, lr, min_lr, warmup), min_lr, rel_tol=1e-12)
    assert math.isclose(d.lr_at(0, steps, lr, 0.0, 0), lr, rel_tol=1e-12)          # no warm-up


def test_stage_schedules(tmp_path, monkeypatch):
    """The small AE trains with 50 warm-up steps and a cosine to 0 at ae_lr; the corrector with
    (steps, lr, min_lr, warmup_steps)."""
    calls, anomalies = [], []
    monkeypatch.setattr(d, 'fit', lambda *a, **k: (calls.append((a[1], a[7])), anomalies.append(a[8:])))
    model, _ = d.train(small_cfg(tmp_path, '--ae_anomaly', '0.3'))
    cfg = model.cfg
    assert calls == [('ae', (cfg['ae_steps'], cfg['ae_lr'], 0.0, 50)),
                     ('diffusion', (cfg['steps'], cfg['lr'], cfg['min_lr'], cfg['warmup_steps']))]
    ae, corrector = anomalies                       # Perlin anomalies on ae_anomaly of the AE's images only
    assert ae[0].func is common.perlin_anomaly and ae[0].keywords['p'] == 0.3 and corrector == ()


def test_latent_term_blur_scales_with_the_latent_grid():
    """sigma_lat is in latent pixels of a 32x32 latent: at a 16x16 latent (64 px, f4) it is sigma_lat / 2,
    applied before the bilinear upsampling."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(1, 3, 64, 64, generator=g)
    z0, z_rec = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    model = tiny_model(sigma_pix=0.0, sigma_lat=1.0, sigma_map=0.0)
    raw = (z_rec - z0).abs().mean(1, keepdim=True).clamp(max=0.4) / 0.4
    want = F.interpolate(common.gaussian_blur(raw, 0.5), size=(64, 64), mode='bilinear', align_corners=False)
    torch.testing.assert_close(model.anomaly_map(x0 + 0.1, x0, z_rec, z0)[2], want[:, 0], atol=1e-6, rtol=0)


def test_extra_scores_are_the_maxima_of_each_term():
    """predict's scores: pixel = max of the Eq. 15 pixel term, latent = max of the latent term."""
    torch.manual_seed(0)
    model = tiny_model(image_size=32)
    torch.nn.init.normal_(model.unet.out[-1].weight, std=0.05)
    batch = dict(image=torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
                 cls=torch.zeros(2, dtype=torch.long), path=['a', 'b'])
    out = model.predict(batch)
    with torch.no_grad():
        z0 = model.encode(batch['image'])[0]
        z_rec = model.correct(z0, batch['cls'])
        _, d_pix, d_lat = model.anomaly_map(model.decode(z_rec), model.decode(z0), z_rec, z0)
    assert not torch.allclose(d_pix.flatten(1).amax(1), d_lat.flatten(1).amax(1))
    torch.testing.assert_close(out['scores']['pixel'], d_pix.flatten(1).amax(1))
    torch.testing.assert_close(out['scores']['latent'], d_lat.flatten(1).amax(1))


def test_timestep_embedding_is_cos_then_sin_with_period_10000(sinusoids):
    t = torch.tensor([0, 1, 123, 999])
    ref = torch.cat(sinusoids(t), 1)                        # [cos, sin]
    torch.testing.assert_close(d.timestep_embedding(t, 8), ref, atol=1e-5, rtol=1e-5)


def test_resblock_forward_by_hand(randomise):
    torch.manual_seed(0)
    blk = randomise(d.ResBlock(16, 32, 8, 0.0)).eval()
    x, emb = torch.randn(2, 16, 4, 4), torch.randn(2, 8)
    ref = blk.skip(x) + blk.out_layers(blk.in_layers(x) + blk.emb_layers[1](F.silu(emb))[:, :, None, None])
    torch.testing.assert_close(blk(x, emb), ref)
    assert not torch.allclose(blk(x, emb), blk(x, emb + 1))


def test_class_conditioning_cross_attends_to_the_class_embedding(randomise):
    """class_cond: every attn2 gets context = class_embed(cls)[:, None], and the class changes the output."""
    torch.manual_seed(0)
    unet = randomise(tiny_model(class_cond=True).unet).eval()
    cls, ctx = torch.tensor([1, 3]), []
    for m in unet.modules():
        if isinstance(m, d.Transformer):
            m.attn2.register_forward_pre_hook(lambda m, a: ctx.append(a[1]))
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 10])
    out = unet(z, t, cls)
    assert ctx and all(torch.equal(c, unet.class_embed(cls)[:, None]) for c in ctx)
    assert not torch.allclose(out, unet(z, t, torch.tensor([0, 2])))


def test_transformer_block_wiring(randomise):
    """attn1 sees norm1 of the proj_in(GN(x)) tokens (B, HW, C); the feed-forward is GEGLU: ff_out's
    input is a * gelu(gate), (a, gate) the two halves of geglu's output, in that order."""
    torch.manual_seed(0)
    tr, seen = randomise(d.Transformer(32, 2)), {}
    tr.proj_in.register_forward_hook(lambda m, i, o: seen.__setitem__('p', o))
    tr.attn1.register_forward_pre_hook(lambda m, i: seen.__setitem__('attn1', i[0]))
    tr.geglu.register_forward_hook(lambda m, i, o: seen.__setitem__('g', o))
    tr.ff_out.register_forward_pre_hook(lambda m, i: seen.__setitem__('ff_out', i[0]))
    tr(torch.randn(2, 32, 4, 4), None)
    torch.testing.assert_close(seen['attn1'], tr.norm1(seen['p'].flatten(2).transpose(1, 2)))
    a, gate = seen['g'].chunk(2, dim=-1)
    torch.testing.assert_close(seen['ff_out'], a * F.gelu(gate))


def test_vae_downsample_pads_right_and_bottom():
    torch.manual_seed(0)
    r, x = d.Resample(4, True), torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(r(x), r.conv(F.pad(x, (0, 1, 0, 1))))
    u = d.Resample(4, False)
    torch.testing.assert_close(u(x), u.conv(x.repeat_interleave(2, 2).repeat_interleave(2, 3)))


def test_vae_mid_block_is_resnet_attention_resnet(randomise):
    torch.manual_seed(0)
    m = d.mid_block(8)
    randomise(m)
    x = torch.randn(1, 8, 4, 4)
    torch.testing.assert_close(d.run_mid(m, x), m.resnets[1](m.attentions[0](m.resnets[0](x))))


def test_unet_upsampling_is_nearest_then_conv():
    unet = tiny_model().unet
    ups = [b.resample for b in unet.up if b.resample is not None]
    assert ups
    for up in ups:
        x = torch.randn(1, up[1].in_channels, 4, 4)
        torch.testing.assert_close(up(x), up[1](x.repeat_interleave(2, 2).repeat_interleave(2, 3)))
