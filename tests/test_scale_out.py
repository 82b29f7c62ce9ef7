"""Scale-out and failure behaviour of every method, each run in fresh processes through
tests/harness.py on a micro configuration (one synthetic category, 32-64 px, a few steps):

- two ranks under torchrun (gloo on the CPU) finish, hold the same frozen backbone and the same
  weights, only rank 0 writes, and the checkpoint loads and predicts;
- a training killed with SIGKILL between checkpoints resumes (with the config it was saved with,
  whatever the defaults say) and ends with exactly the weights of an uninterrupted run of the same seed;
- a NaN loss stops training with a one-line message and keeps the last good checkpoint, and a NaN
  on one of two ranks stops both (no rank waits forever for the other's gradients);
- --dtype bfloat16 runs in bfloat16 on the CPU too, and --compile compiles for training only;
- the paper presets of the feature methods never train on a random backbone when ImageNet weights
  are missing;
- every Model keeps float32 buffers and a config of plain Python types.
"""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(ROOT, 'tests', 'harness.py')
ENV = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')

# per method: micro options, and a loss check (a step) after the first checkpoint (every 2 steps) but
# before the end, where the kill test strikes
MICRO = {
    'lasb': ('--category weave --image_size 32 --ae_ch 8 --n_embed 32 --vq_restart 2 --ch 8 --ch_mult 1,2 '
             '--attn_res 4 --num_heads 2 --backbone resnet18 --ae_batch_size 4 --batch_size 4 --nfe 2 '
             '--ae_steps 3 --steps 3 --ckpt_interval 2 --log_interval 2', 5),
    'inversion_ad': ('--category weave --backbone pixels --image_size 32 --feature_size 4 --ch 32 '
                     '--ch_mult 1,2 --attn_ds 2 --num_heads 2 --batch_size 24 --epochs 1 --warmup_epochs 0 '
                     '--S 2 --ckpt_interval 2 --log_interval 2', 5),
    'omiad': ('--category weave --image_size 64 --feature_size 8 --ch 32 --attn_res 4 --num_heads 2 --batch_size 4 '
              '--bn_images 16 --val_images 4 --amdm_steps 4 --asd_steps 4 --psi_warmup 1 --adv_start 2 '
              '--t_init 200 --ckpt_interval 2 --log_interval 2', 4),
    'decodiff': ('--category weave --image_size 32 --batch_size 4 --ae_steps 4 --steps 4 --ae_crop 16 '
                 '--patch_sizes 1,2 --patch_probs 0.5,0.5 --ckpt_interval 2 --log_interval 2', 5),
    'diffusionad': ('--category weave --image_size 32 --ch 16 --ch_mult 1,2 --attn_res 16 --seg_ch 8 '
                    '--seg_levels 3 --batch_size 4 --steps 4 --ckpt_interval 2 --log_interval 2', 3),
}
METHODS = sorted(MICRO)


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs use one thread like the subprocesses (ENV): CPU results are bit-identical
    only for the same number of threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def harness(method, dump, out_dir, *flags, torchrun=False, extra=()):
    """Run the harness; returns the CompletedProcess (never raises)."""
    launcher = ([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
                if torchrun else [sys.executable])
    argv = MICRO[method][0].split() + ['--device', 'cpu', '--out_dir', str(out_dir)] + list(extra)
    return subprocess.run(launcher + [HARNESS, method, str(dump), *flags, '--'] + argv,
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def final_state(dump, rank=0):
    return torch.load(os.path.join(dump, f'rank{rank}.pt'), weights_only=True)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f'{len(different)} tensors differ, e.g. {different[:3]}'


def load_and_predict(method, ckpt_path, finished=True):
    """The checkpoint loads into a fresh Model and scores two test images (one normal, one not);
    a mid-run checkpoint warns that training had not ended, and a mid-run InversionAD one scores NaN
    (its validation statistics come at the end)."""
    module = __import__(method)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        model, _ = common.load(ckpt_path, module.Model, device='cpu')
    assert any('before training ended' in str(w.message) for w in caught) == (not finished)
    test = common.load_dataset(model.cfg, 'test')
    idx = [0, len(test) - 1]
    batch = dict(image=torch.stack([test[i]['image'] for i in idx]), cls=torch.zeros(2, dtype=torch.long),
                 path=[test.paths[i] for i in idx])
    with torch.no_grad():
        out = model.predict(batch)
    assert out['score'].shape == (2,) and torch.isfinite(out['score']).all() == (finished or method != 'inversion_ad')
    assert out['map'].shape[0] == 2 and torch.isfinite(out['map']).all()


@pytest.mark.parametrize('method', METHODS)
def test_two_ranks_agree_and_only_rank_0_writes(method, tmp_path):
    run = harness(method, tmp_path / 'dump', tmp_path / 'out', torchrun=True)
    assert run.returncode == 0, run.stderr[-3000:]
    r0, r1 = final_state(tmp_path / 'dump', 0), final_state(tmp_path / 'dump', 1)
    assert (r0['world'], r1['world']) == (2, 2)
    assert_same_weights(r0['state'], r1['state'])           # frozen backbone, BN statistics, trained nets
    assert r1['writes'] == []                                # rank 1 never writes a file
    assert run.stdout.count(f'{method}: preset') == 1        # the config is printed once
    ckpt = str(tmp_path / 'out' / 'ckpt.pt')
    assert any(w.startswith(ckpt) for w in r0['writes'])     # common.save writes ckpt.pt.tmp, then renames
    load_and_predict(method, ckpt)


def micro_cfg(method, out_dir, *extra):
    module = __import__(method)
    argv = MICRO[method][0].split() + ['--device', 'cpu', '--out_dir', str(out_dir)] + list(extra)
    return module, common.get_config(module.config, module.PRESETS, argv, module.__file__)


@pytest.mark.parametrize('method', METHODS)
def test_killed_training_resumes_to_the_same_weights(method, tmp_path):
    module, cfg = micro_cfg(method, tmp_path / 'straight')
    straight, _ = module.train(cfg)
    killed = harness(method, tmp_path / 'dump', tmp_path / 'killed', '--kill_at', str(MICRO[method][1]))
    assert killed.returncode == -9                           # SIGKILL between checkpoints: no cleanup ran
    ckpt = common.read_checkpoint(str(tmp_path / 'killed' / 'ckpt.pt'))
    assert ckpt['step'] > 0 and ckpt['final'] is False       # an earlier one is intact, marked unfinished
    cfg = micro_cfg(method, tmp_path / 'killed', '--resume')[1]
    cfg['val_frac'] = 0.3     # as if a default had changed since: the run keeps its saved config
    resumed, _ = module.train(cfg)
    assert_same_weights(straight.state_dict(), resumed.state_dict())
    assert common.read_checkpoint(str(tmp_path / 'killed' / 'ckpt.pt'))['final'] is True
    before = (tmp_path / 'straight' / 'ckpt.pt').read_bytes()       # a finished run resumed with a key that
    module.train(micro_cfg(method, tmp_path / 'straight', '--resume', '--log_interval', '3')[1])   # trains
    assert (tmp_path / 'straight' / 'ckpt.pt').read_bytes() == before                 # nothing: not re-saved


@pytest.mark.parametrize('method', METHODS)
def test_draws_from_device_generators_name_their_device(method, tmp_path, monkeypatch):
    """common.generator(..., device='cuda') lives on the GPU, and a draw from it that does not say
    device=g.device stops there ('Expected a 'cpu' device type for generator'). CI has no GPU, so
    every randn, rand, randint and randperm from a generator given a device is checked here. Training
    makes such draws; predict makes none (test-time noise is drawn on the CPU on every device)."""
    real_generator, given, checked = common.generator, {}, []

    def generator(*keys, device=None):
        g = real_generator(*keys) if device is None else real_generator(*keys, device=device)
        if device is not None:
            given[id(g)] = g                                 # held, so that no other generator gets its id
        return g

    def checking(name, draw):
        def checked_draw(*args, **kwargs):
            if id(kwargs.get('generator')) in given:
                assert torch.device(kwargs.get('device', 'meta')) == kwargs['generator'].device, \
                    f'torch.{name} draws from a device generator without device=g.device'
                checked.append(name)
            return draw(*args, **kwargs)
        return checked_draw
    monkeypatch.setattr(common, 'generator', generator)
    for name in ('randn', 'rand', 'randint', 'randperm'):
        monkeypatch.setattr(torch, name, checking(name, getattr(torch, name)))
    module, cfg = micro_cfg(method, tmp_path)
    module.train(cfg)
    trained = len(checked)
    load_and_predict(method, str(tmp_path / 'ckpt.pt'))
    assert trained > 0 and len(checked) == trained


@pytest.mark.parametrize('method', METHODS)
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(method, tmp_path, monkeypatch):
    real_check = common.check_finite
    monkeypatch.setattr(common, 'check_finite', lambda loss, step, path: real_check(
        loss * float('nan') if step >= 2 else loss, step, path))
    module, cfg = micro_cfg(method, tmp_path)
    with pytest.raises(common.UserError, match='loss is not finite at step 2 .here nan.*last good checkpoint'):
        module.train(cfg)
    ckpt = common.read_checkpoint(str(tmp_path / 'ckpt.pt'))
    assert ckpt['step'] == 2                                 # written after step 2, before the NaN
    assert all(torch.isfinite(v).all() for k, v in ckpt['model'].items() if v.is_floating_point() and k != 'val_stats')
    if ckpt.get('stage', 2) in (1, 'ae'):       # the scoring networks are not trained yet: refused
        with pytest.raises(common.UserError, match='finish the run with --resume'):
            load_and_predict(method, str(tmp_path / 'ckpt.pt'))
    else:
        load_and_predict(method, str(tmp_path / 'ckpt.pt'), finished=False)


def test_a_nan_on_one_rank_stops_both_ranks(tmp_path):
    run = harness('diffusionad', tmp_path / 'dump', tmp_path / 'out', '--nan_on_rank', '1', torchrun=True)
    assert run.returncode != 0 and run.stderr.count('error: loss is not finite at step 2') == 2, run.stderr[-3000:]
    assert common.read_checkpoint(str(tmp_path / 'out' / 'ckpt.pt'))['step'] == 2


@pytest.mark.parametrize('method', METHODS)
def test_bfloat16_runs_in_bfloat16_on_the_cpu_too(method, tmp_path, monkeypatch):
    """--dtype bfloat16 autocasts on any device, so the dtype results.json records is the one that
    ran: convolutions of training and of predict return bfloat16, and the model still scores."""
    conv, dtypes = torch.nn.functional.conv2d, []

    def recording_conv2d(*args, **kwargs):
        out = conv(*args, **kwargs)
        dtypes.append(out.dtype)
        return out
    monkeypatch.setattr(torch.nn.functional, 'conv2d', recording_conv2d)
    module, cfg = micro_cfg(method, tmp_path, '--dtype', 'bfloat16')
    module.train(cfg)
    assert torch.bfloat16 in dtypes
    dtypes.clear()
    load_and_predict(method, str(tmp_path / 'ckpt.pt'))
    assert torch.bfloat16 in dtypes


@pytest.mark.parametrize('method', METHODS)
def test_compile_is_for_training_only(method, tmp_path, monkeypatch):
    """--compile wraps the networks for training; evaluation (predict) runs the networks themselves
    (a compiled copy would be timed, and recompiled for every new input shape)."""
    calls = []

    class Compiled(torch.nn.Module):      # as torch's OptimizedModule: `net or default` raises
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *a, **k):
            calls.append(type(self.module).__name__)
            return self.module(*a, **k)

        def __len__(self):
            raise TypeError(f'{type(self.module).__name__} does not support len()')
    options = {}                          # id(network) -> the keyword arguments it was compiled with

    def fake_compile(module, **kwargs):
        options[id(module)] = kwargs
        return Compiled(module)
    monkeypatch.setattr(torch, 'compile', fake_compile)
    module, cfg = micro_cfg(method, tmp_path, '--compile')
    model, _ = module.train(cfg)
    assert calls
    if method == 'lasb':                  # Inductor failed on the decoder with dynamic shapes (torch 2.14, CPU)
        assert options[id(model.ae.encoder)] == options[id(model.ae.decoder)] == dict(dynamic=False)
    calls.clear()
    test = common.load_dataset(model.cfg, 'test')            # the trained model, as common.run evaluates it
    with torch.no_grad():
        model.predict(dict(image=test[0]['image'][None], cls=torch.zeros(1, dtype=torch.long), path=test.paths[:1]))
    assert calls == []


@pytest.mark.parametrize('method', ['inversion_ad', 'lasb', 'omiad'])
def test_paper_preset_never_trains_on_a_random_backbone(method, tmp_path, monkeypatch):
    """Their paper presets take ImageNet weights from the timm cache: with none there, training
    stops at once with the fix instead of training on a random backbone."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'empty_cache'))
    argv = MICRO[method][0].replace('--backbone pixels', '').split()       # the paper's backbone
    argv += ['--score_pool', '2,8'] if method == 'lasb' else []            # the paper's 8,8 needs > 56 px
    module = __import__(method)
    cfg = common.get_config(module.config, module.PRESETS, argv + ['--preset', 'paper', '--device', 'cpu',
                                                                   '--out_dir', str(tmp_path / 'out')], module.__file__)
    with pytest.raises(common.UserError, match="not in the timm cache.*--backbone_weights FILE .'' = a random"):
        module.train(cfg)
    assert not os.path.exists(tmp_path / 'out' / 'ckpt.pt')



@pytest.mark.parametrize('method', METHODS)
def test_models_keep_float32_buffers_and_a_plain_config(method, tmp_path):
    """DESIGN: schedule buffers are float32 (no float64, which MPS lacks and which bf16 would not
    touch) and model.cfg holds plain Python types, as a weights_only checkpoint needs."""
    module, cfg = micro_cfg(method, tmp_path)
    model = module.Model(cfg)
    assert [n for n, b in model.named_buffers() if b.is_floating_point() and b.dtype != torch.float32] == []

    def plain(v):
        if isinstance(v, (tuple, list)):
            return all(map(plain, v))
        if isinstance(v, dict):
            return all(isinstance(k, str) and plain(x) for k, x in v.items())
        return v is None or isinstance(v, (bool, int, float, str))
    assert plain(model.cfg)


@pytest.mark.parametrize('method', METHODS)
def test_keys_saved_under_older_names_take_todays_names(method):
    """A method's RENAMED maps the keys it has renamed, in configs and cli_keys (common.current_names)."""
    renamed = __import__(method).RENAMED
    old = dict(method=method, config=dict({k: i for i, k in enumerate(renamed)}, seed=5, cli_keys=(*renamed, 'seed')))
    new = common.current_names(old)['config']
    assert new == dict({renamed[k]: i for i, k in enumerate(renamed)}, seed=5, cli_keys=(*renamed.values(), 'seed'))


def test_a_checkpoint_saved_before_a_rename_loads_and_resumes_as_saved(tmp_path):
    """OmiAD's micro run has 2 attention heads (tiny: 4) on an 8x8 grid (tiny: 32): saved under the
    old names heads / feat_size, the run must not silently come back with the defaults."""
    module, cfg = micro_cfg('omiad', tmp_path)
    module.train(cfg)
    path = str(tmp_path / 'ckpt.pt')
    c = torch.load(path, weights_only=True)
    back = {new: old for old, new in module.RENAMED.items()}
    c['config'] = {back.get(k, k): v for k, v in c['config'].items()}
    c['config']['cli_keys'] = tuple(back.get(k, k) for k in c['config']['cli_keys'])
    torch.save(c, path)
    assert 'heads' in torch.load(path, weights_only=True)['config']
    model, _ = common.load(path, module.Model)
    assert (model.cfg['num_heads'], model.cfg['feature_size']) == (2, 8) and 'heads' not in model.cfg
    resumed, _ = module.train(micro_cfg('omiad', tmp_path, '--resume', '--asd_steps', '5')[1])   # trains on
    assert resumed.cfg['num_heads'] == 2 and resumed.cfg['backbone_record']['id'].startswith('pixels')   # no KeyError


def test_run_under_torchrun_trains_evaluates_on_rank_0_and_resumes_an_each_run(tmp_path):
    """common.run itself with 2 ranks (the harness calls train() directly): a --category each run trains
    every category, rank 0 evaluates while rank 1 waits at the barrier, and --resume of the finished run
    keeps every category; both exit cleanly."""
    toy = os.path.join(ROOT, 'tests', 'toy_method.py')
    launch = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', toy,
              '--category', 'each', '--device', 'cpu', '--out_dir', str(tmp_path)]
    env = dict(ENV, PYTHONPATH=ROOT)                                      # toy_method imports common
    first = subprocess.run(launch, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    for cat in common.SYNTHETIC:
        assert common.read_checkpoint(str(tmp_path / cat / 'ckpt.pt'))['final']
        assert os.path.isfile(tmp_path / cat / 'results.json')
    assert set(json.load(open(tmp_path / 'results.json'))['metrics']) == set(common.SYNTHETIC) | {'mean'}
    again = subprocess.run(launch + ['--resume'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count('finished; kept as it was') == len(common.SYNTHETIC)    # printed once (rank 0)
