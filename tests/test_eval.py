"""Tests of eval.py and common.run end to end: the baselines, a toy method (tests/toy_method.py)
trained, evaluated, resumed and compared; heatmaps, overrides, --predict, edge cases."""
import json
import math
import os
import shutil
import subprocess
import sys
import time
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

import common
import eval as E
import toy_method
from common import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ('method', 'data', 'category', 'preset', 'seed', 'config', 'protocol', 'versions', 'metrics',
        'extra', 'nfe', 'ms_per_image', 'train_seconds', 'params')


def fake_clock(monkeypatch):
    """time.perf_counter (eval's timer) reads a clock that only the test advances: timings exact."""
    clock = [0.0]
    monkeypatch.setattr(time, 'perf_counter', lambda: clock[0])
    return clock


def toy(tmp_path, *argv):
    out = str(tmp_path / 'run')
    toy_method.main(['--out_dir', out, *argv])
    return out


def test_baselines_on_the_frozen_benchmark(capsys):
    """The two baselines' mean image / pixel AUROC, which set the methods' bars (README): fixed numbers,
    so a change to the benchmark data, the baselines or the metrics shows here."""
    cfg = common.data_defaults(dict(common.BASE_CONFIG, category='all'))
    base = E.baselines(cfg)
    for kind, image, pixel in (('mean', 0.59958, 0.82839), ('zscore', 0.62208, 0.77496)):
        mean = base[kind]['metrics']['mean']
        assert abs(mean['image_auroc'] - image) < 5e-5 and abs(mean['pixel_auroc'] - pixel) < 5e-5, kind
        assert set(base[kind]['metrics']) == set(common.SYNTHETIC) | {'mean'}


def test_heatmaps_share_one_colour_scale_per_category(tmp_path):
    """A normal image whose map is low everywhere stays at the cold end of the scale set by the
    category's anomalous image, instead of being stretched over the full scale on its own."""
    class Data:
        paths, masks = ['good/000.png', 'crack/001.png'], torch.zeros(2, 1, 16, 16, dtype=torch.uint8)
        __len__ = lambda self: 2
        __getitem__ = lambda self, i: dict(image=torch.full((3, 16, 16), 0.5))
    ramp = np.linspace(0, 1, 16, dtype=np.float32)[None].repeat(16, 0)
    outs = dict(map=np.stack([0.1 * ramp, ramp]), recon=None)
    E.write_heatmaps(str(tmp_path), Data(), outs, 2)
    tile = np.asarray(Image.open(tmp_path / 'good_000.png'))[:, 32:48]
    want = np.uint8(0.5 * 127 + 0.5 * E._jet(0.1 * ramp))          # 0.5 -> 127 as _panel rounds down
    stretched = np.uint8(0.5 * 127 + 0.5 * E._jet(ramp))
    assert np.abs(tile.astype(int) - want).max() <= 1 and np.abs(tile.astype(int) - stretched).max() > 50


def test_mask_outline_does_not_wrap_around_the_image():
    """The ground-truth outline marks the mask's own border pixels; a defect touching the bottom edge
    draws nothing on the top row (np.roll would wrap it there)."""
    mask = np.zeros((8, 8), bool)
    mask[5:8, 2:4] = True
    red = (E._panel(np.zeros((8, 8, 3)), mask, np.zeros((8, 8)), 0, 1)[:, 8:16] == (255, 0, 0)).all(-1)
    want = np.zeros((8, 8), bool)
    want[5, 2:4] = want[5:8, 2] = True                   # first rows/columns inside, from the top and the left
    want[5:8, 4] = True                                  # and the first column right of it
    assert np.array_equal(red, want)


def test_results_are_written_before_the_baselines_run(tmp_path, monkeypatch):
    """An evaluation's results.json survives a failure in the baselines (e.g. a data root without train/)."""
    def no_baselines(cfg):
        raise UserError('no images in train/good')
    monkeypatch.setattr(E, 'baselines', no_baselines)
    with pytest.raises(UserError, match='no images'):
        E.evaluate(FnModel(channel0), dataset(three_categories()), str(tmp_path))
    assert json.load(open(tmp_path / 'results.json'))['metrics']['a']['image_auroc'] == 1.0


def test_reevaluation_from_inside_the_run_folder_rewrites_its_results(tmp_path, monkeypatch):
    """`cd out/<run>; python eval.py ckpt.pt --heatmaps 1`: the run's results.json and heatmaps are written
    (not silently skipped), and its config records this evaluation's heatmaps."""
    out = toy(tmp_path, '--category', 'weave')
    os.remove(os.path.join(out, 'results.json'))
    monkeypatch.chdir(out)
    E.main(['ckpt.pt', '--heatmaps', '1'])
    assert json.load(open('results.json'))['config']['heatmaps'] == 1 and len(os.listdir('heatmaps/weave')) == 1


def test_run_baselines_writes_results(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    E.main(['--baselines', '--category', 'weave'])
    r = json.load(open(tmp_path / 'out' / 'baseline_zscore_synthetic_weave_s0' / 'results.json'))
    assert set(KEYS) <= set(r) and r['method'] == 'baseline_zscore' and r['nfe'] == {}
    assert set(r['metrics']) == {'weave', 'mean'} and set(r['metrics']['mean']) == set(common.METRICS) | {'mad'}
    assert 'baseline_zscore | synthetic | weave' in capsys.readouterr().out


def test_train_evaluate_and_results_schema(tmp_path, capsys):
    out = toy(tmp_path, '--heatmaps', '2', '--category', 'weave')
    r = json.load(open(os.path.join(out, 'results.json')))
    assert set(KEYS) <= set(r) and r['category'] == 'weave' and r['preset'] == 'tiny'
    assert r['nfe'] == {'net': 1} and r['params']['net'] == r['params']['total'] > 0
    assert r['protocol']['eval_size'] == 128 and r['config']['steps'] == 6 and r['ms_per_image'] > 0
    assert r['versions']['torch'] == str(torch.__version__) and r['train_seconds'] > 0
    assert r['train_seconds'] == common.read_checkpoint(out)['train_seconds']    # as a re-evaluation reports it
    m = r['metrics']['weave']
    assert all(0 <= m[k] <= 1 for k in common.METRICS) and m['mad'] == pytest.approx(np.mean([m[k] for k in common.METRICS]))
    pngs = sorted(os.listdir(os.path.join(out, 'heatmaps', 'weave')))
    assert len(pngs) == 2 and Image.open(os.path.join(out, 'heatmaps', 'weave', pngs[0])).size == (4 * 128, 128)
    Image.new('RGB', (8, 8)).save(os.path.join(out, 'heatmaps', 'weave', 'earlier_model.png'))
    E.main([out, '--heatmaps', '2'])                   # re-evaluated into the run folder: its panels only
    assert sorted(os.listdir(os.path.join(out, 'heatmaps', 'weave'))) == pngs
    printed = capsys.readouterr().out
    assert 'baseline mean (mean)' in printed and 'baseline zscore (mean)' in printed


def test_each_runs_one_model_per_category_and_a_mean_row(tmp_path):
    out = toy(tmp_path, '--category', 'each', '--steps', '2')
    for cat in common.SYNTHETIC:
        assert os.path.isfile(os.path.join(out, cat, 'ckpt.pt'))
    r = json.load(open(os.path.join(out, 'results.json')))
    assert r['category'] == 'each' and r['missing'] == [] and set(r['metrics']) == set(common.SYNTHETIC) | {'mean'}
    assert r['metrics']['mean']['image_auroc'] == pytest.approx(np.mean([r['metrics'][c]['image_auroc'] for c in common.SYNTHETIC]))
    runs = E.compare(str(tmp_path))
    assert list(runs) == [('toy_method', 'synthetic', 'each', 'tiny')]   # members folded into the summary
    assert list(E.compare(os.path.join(out, 'grain'))) == [('toy_method', 'synthetic', 'grain', 'tiny')]   # or alone
    for argv in (['--resume'], ['--eval'], ['--eval', '--category', 'each', '--data_root', 'elsewhere']):
        with pytest.raises(UserError, match='holds a --category each run: add --category each --data synthetic '
                                            '--data_root data/synthetic'):        # its categories come from these
            toy_method.main(['--out_dir', out, *argv])


def test_a_fresh_each_run_stops_before_training_if_any_category_has_a_checkpoint(tmp_path):
    out = str(tmp_path / 'run')
    os.makedirs(os.path.join(out, 'grain'))
    open(os.path.join(out, 'grain', 'ckpt.pt'), 'wb').close()
    with pytest.raises(UserError, match='grain.ckpt.pt exists: --resume continues it'):
        toy_method.main(['--out_dir', out, '--category', 'each', '--steps', '2'])
    assert not os.path.exists(os.path.join(out, 'weave', 'ckpt.pt'))     # weave, the first, did not train


def assert_same_checkpoints(a, b):
    a, b = (torch.load(os.path.join(p, 'ckpt.pt'), weights_only=True) for p in (a, b))
    assert a['step'] == b['step']
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k


def test_resume_keeps_the_saved_config_and_the_keys_given(tmp_path, capsys):
    """--resume continues with the config the run was saved with (category weave, lr 0.05 and width 4
    here, not the defaults), keys given on the command line win (steps 3 -> 6, printed), and the
    result is the uninterrupted run."""
    straight = toy(tmp_path / 'a', '--category', 'weave', '--steps', '6', '--lr', '0.05', '--width', '4')
    cut = toy(tmp_path / 'b', '--category', 'weave', '--steps', '3', '--lr', '0.05', '--width', '4')
    capsys.readouterr()
    toy_method.main(['--out_dir', cut, '--steps', '6', '--resume'])
    assert 'resuming with steps = 6 (the checkpoint had 3)' in capsys.readouterr().out
    assert_same_checkpoints(straight, cut)
    r = json.load(open(os.path.join(cut, 'results.json')))
    assert (r['config']['lr'], r['category']) == (0.05, 'weave')
    with pytest.raises(UserError, match=r'does not match .* \(the network cannot change on --resume; typed: --width\)'):
        toy_method.main(['--out_dir', cut, '--width', '8', '--resume'])
    with pytest.raises(UserError, match=r'missing .* typed: --steps --width\)'):   # what does not fit, and what was typed
        toy_method.main(['--out_dir', cut, '--width', '8', '--steps', '7', '--resume'])
    assert E.main([cut])['config']['lr'] == 0.05                       # eval.py takes a run folder too
    with pytest.raises(UserError, match=r"--backbone_weights: this run is past its start \(its backbone, random init"):
        toy_method.main(['--out_dir', cut, '--steps', '7', '--backbone_weights', 'b4.pth', '--resume'])   # not used


def test_resume_of_a_finished_run_evaluates_it_without_training_or_saving(tmp_path, capsys):
    """Nothing to train: the run is evaluated as --eval does; the checkpoint and its training time
    are kept (not re-saved with the clock of a 0-step run). A typed --steps still continues it."""
    out = toy(tmp_path, '--category', 'weave', '--steps', '3')
    ckpt = os.path.join(out, 'ckpt.pt')
    saved, seconds = open(ckpt, 'rb').read(), common.read_checkpoint(ckpt)['train_seconds']
    capsys.readouterr()
    toy_method.main(['--out_dir', out, '--resume'])
    assert 'has finished training: evaluating it, as --eval does' in capsys.readouterr().out
    assert open(ckpt, 'rb').read() == saved
    assert json.load(open(os.path.join(out, 'results.json')))['train_seconds'] == seconds
    toy_method.main(['--out_dir', out, '--resume', '--lr', '0.5'])        # typed, but lengthens nothing
    assert 'note: nothing was trained: ' in capsys.readouterr().out and common.read_checkpoint(ckpt)['step'] == 3
    with pytest.raises(UserError, match=r'is evaluated as trained \(noise 0.0\); .* python eval.py \S+ --noise 0.3'):
        toy_method.main(['--out_dir', out, '--resume', '--noise', '0.3'])    # an inference key: eval.py's job
    toy_method.main(['--out_dir', out, '--resume', '--lr', '0.7', '--noise', '0.3'])   # nothing trained: as saved
    assert json.load(open(os.path.join(out, 'results.json')))['config']['noise'] == 0.0
    assert 'evaluated as saved' in capsys.readouterr().out
    toy_method.main(['--out_dir', out, '--resume', '--steps', '4'])
    assert common.read_checkpoint(ckpt)['step'] == 4 and 'nothing was trained' not in capsys.readouterr().out


def test_each_resumes_its_killed_category_and_trains_the_rest(tmp_path, capsys):
    """A killed --category each run has a checkpoint for its first category only (no results.json):
    --resume continues it and trains the others from the start with the options the run was started
    with (lr 0.05, not typed again), ending as the uninterrupted run; a finished category is kept."""
    straight = toy(tmp_path / 'a', '--category', 'each', '--steps', '4', '--lr', '0.05')
    cut = str(tmp_path / 'b' / 'run')
    toy_method.main(['--out_dir', os.path.join(cut, 'weave'), '--category', 'weave', '--steps', '2', '--lr', '0.05'])
    os.remove(os.path.join(cut, 'weave', 'results.json'))             # killed before its evaluation
    toy_method.main(['--out_dir', cut, '--category', 'each', '--steps', '4', '--resume'])
    for cat in common.SYNTHETIC:
        assert_same_checkpoints(os.path.join(straight, cat), os.path.join(cut, cat))
    capsys.readouterr()
    toy_method.main(['--out_dir', cut, '--category', 'each', '--resume'])
    assert capsys.readouterr().out.count('finished; kept as it was') == 4
    grain = os.path.join(cut, 'grain', 'ckpt.pt')          # a mid-run checkpoint evaluated by hand (eval.py)
    torch.save(dict(torch.load(grain, weights_only=True), final=False, step=2), grain)
    toy_method.main(['--out_dir', cut, '--category', 'each', '--resume'])
    assert 'grain: finished' not in capsys.readouterr().out and common.read_checkpoint(grain)['final']
    toy_method.main(['--out_dir', cut, '--category', 'each', '--steps', '5', '--resume'])   # typed: continues
    assert all(common.read_checkpoint(os.path.join(cut, c))['step'] == 5 for c in common.SYNTHETIC)


def test_checkpoint_evaluation_overrides_and_predict(tmp_path, capsys):
    out = toy(tmp_path, '--category', 'capsule')
    ckpt = os.path.join(out, 'ckpt.pt')
    own = open(os.path.join(out, 'results.json')).read()
    r = E.main([ckpt, '--noise', '0.1', '--batch_size', '7'])
    assert os.path.isfile(os.path.join(out, 'eval_noise0.1_batch_size7', 'results.json'))
    E.main([ckpt, '--batch_size', '5'])                    # a run-time override too gets its own folder
    assert os.path.isfile(os.path.join(out, 'eval_batch_size5', 'results.json'))
    assert open(os.path.join(out, 'results.json')).read() == own and 'trained_with' in r['versions']
    E.main([out, '--batch_size', '6', '--data_root', 'x/y'])   # a run folder; a path value: one folder
    assert os.path.isfile(os.path.join(out, 'eval_batch_size6_data_rootx-y', 'results.json'))
    folders = sorted(os.listdir(out))
    E.main([out, '--batch_size', '6', '--data_root', 'x/y/'])   # the same path: the same folder
    E.main([out, '--batch_size', str(common.read_checkpoint(ckpt)['config']['batch_size'])])   # as trained: the run's
    assert sorted(os.listdir(out)) == folders
    mid = tmp_path / 'mid'                                                 # saved mid-run: its own folder
    shutil.copytree(out, mid)
    torch.save(dict(torch.load(mid / 'ckpt.pt', weights_only=True), final=False, step=3), mid / 'ckpt.pt')
    with pytest.warns(UserWarning, match='before training ended'):
        E.main([str(mid)])
    assert os.path.isfile(mid / 'eval_step3' / 'results.json')
    with pytest.raises(UserError, match='saved at step 3, before training ended: finish it with --resume, or'):
        toy_method.main(['--out_dir', str(mid), '--category', 'capsule', '--eval'])
    E.main([out, '--out_dir', str(tmp_path / 'mine')])                     # where the user says
    assert os.path.isfile(tmp_path / 'mine' / 'results.json')
    with pytest.raises(UserError, match=r'no checkpoint in \S+, but in its subfolders .*: give one, e.g. \S+(mid|run)'):
        E.main([str(tmp_path)])                                           # like the folder of an 'each' run
    with pytest.raises(UserError, match=r'no checkpoint in \S+, but in its subfolders'):
        E.main(['--predict', str(tmp_path / 'ckpt.pt'), 'x.png'])         # ... or its missing ckpt.pt
    for typo in ('nope.pt', 'runn'):                                      # not a pointer to some other run
        with pytest.raises(UserError, match=r'no checkpoint at \S+' + typo):
            E.main([str(tmp_path / typo)])
    with pytest.raises(UserError, match='--width cannot change without retraining; inference keys of toy_method: noise'):
        E.main([ckpt, '--width', '4'])
    with pytest.raises(UserError, match='unknown option --S'):
        E.main([ckpt, '--S', '3'])
    for key, value in (('heatmaps', '-1'), ('batch_size', '0')):   # refused before anything is evaluated
        with pytest.raises(UserError, match=f'--{key} must be at least .* \\(got {value}\\)'):
            E.main([ckpt, f'--{key}', value])
    with pytest.raises(UserError, match=r'\S+ is evaluated as trained \(noise 0.0\); for other data or inference keys '
                                        r'run: python eval.py \S+ckpt.pt --noise 0.2'):
        toy_method.main(['--out_dir', out, '--category', 'capsule', '--eval', '--noise', '0.2'])
    with pytest.raises(UserError, match=r"as trained \(data_root 'data/synthetic'\); .* python eval.py \S+ --data_root x"):
        toy_method.main(['--out_dir', out, '--category', 'capsule', '--eval', '--data_root', 'x'])  # not over its results
    with pytest.raises(UserError, match=r"as trained \(data 'synthetic'\)"):   # its preset, not
        toy_method.main(['--out_dir', out, '--eval', '--data', 'mvtec'])    # the paper one --data mvtec would pick
    for key, value in (('batch_size', '1'), ('dtype', 'bfloat16')):      # they would change its results
        with pytest.raises(UserError, match=rf'as trained \({key} .*\); .* python eval.py \S+ --{key} {value}'):
            toy_method.main(['--out_dir', out, '--category', 'capsule', '--eval', f'--{key}', value])
    E.main([ckpt, '--device', 'auto', '--out_dir', str(tmp_path / 'auto')])   # eval.py picks the device
    with pytest.raises(UserError, match=r'as trained \(eval_size 128\); only inference keys may differ, through '
                                        r'python eval.py \S+ \(noise\)'):
        toy_method.main(['--out_dir', out, '--category', 'capsule', '--eval', '--eval_size', '64'])
    with pytest.raises(UserError, match=r'ckpt.pt exists: --resume continues it, --eval evaluates it'):
        toy_method.main(['--out_dir', out, '--category', 'capsule'])          # never restarted silently
    noisy = toy(tmp_path / 'noisy', '--category', 'capsule', '--noise', '0.05')
    toy_method.main(['--out_dir', noisy, '--category', 'capsule', '--eval'])   # not typed: as trained
    assert json.load(open(os.path.join(noisy, 'results.json')))['config']['noise'] == 0.05
    # one image through --predict scores exactly as in the evaluation of the whole set
    test = common.load_dataset(dict(json.load(open(os.path.join(out, 'results.json')))['config'], image_size=128), 'test')
    img = tmp_path / 'one.png'
    Image.fromarray(test.images[45].numpy().transpose(1, 2, 0)).save(img)
    model, _ = common.load(ckpt, toy_method.Model)
    small = common.load_dataset(model.cfg, 'test')
    expected = model.predict(dict(image=small[45]['image'][None], cls=torch.zeros(1, dtype=torch.long), path=['x']))['score']
    score, amap = E.predict(ckpt, str(img), str(tmp_path / 'new' / 'h.png'))     # the folder is made
    assert score == pytest.approx(expected.item(), abs=1e-6) and os.path.isfile(tmp_path / 'new' / 'h.png')
    assert r['metrics']['capsule']['image_auroc'] == r['metrics']['capsule']['image_auroc']   # not NaN


def test_predict_draws_the_noise_of_the_evaluation(tmp_path, monkeypatch):
    """An image inside the model's data root is keyed by its path there, as evaluation keys it, so a
    method with test-time noise scores it alike; outside the root, by its file name."""
    ckpt = os.path.abspath(os.path.join(toy(tmp_path, '--category', 'capsule', '--noise', '0.5'), 'ckpt.pt'))
    model, _ = common.load(ckpt, toy_method.Model)
    monkeypatch.chdir(tmp_path)                               # data_root data/synthetic is relative
    rel = 'capsule/test/scratch/007.png'
    for where in (os.path.join('data', 'synthetic', rel), os.path.join('elsewhere', rel)):
        os.makedirs(os.path.dirname(where), exist_ok=True)
        Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(where)
    x = torch.full((1, 3, 32, 32), 90 / 255)
    own, by_name = (model.predict(dict(image=x, cls=torch.zeros(1, dtype=torch.long), path=[p]))['score'].item()
                    for p in (rel, '007.png'))
    assert own != pytest.approx(by_name, abs=1e-6)           # the key matters: the test can fail
    assert E.predict(ckpt, os.path.join('data', 'synthetic', rel))[0] == pytest.approx(own, abs=1e-6)
    assert E.predict(ckpt, os.path.join('elsewhere', rel), 'out.png')[0] == pytest.approx(by_name, abs=1e-6)
    quiet = common.load(ckpt, toy_method.Model, overrides={'noise': 0.0})[0]      # an inference key typed, as for
    want = quiet.predict(dict(image=x, cls=torch.zeros(1, dtype=torch.long), path=[rel]))['score'].item()   # --eval
    assert want != pytest.approx(own, abs=1e-6)
    assert E.main(['--predict', ckpt, os.path.join('data', 'synthetic', rel), '--noise', '0'])[0] == pytest.approx(want)
    with pytest.raises(UserError, match='--steps cannot change without retraining; inference keys of toy_method: noise'):
        E.main(['--predict', ckpt, os.path.join('data', 'synthetic', rel), '--steps', '3'])
    assert common.path_key(os.path.join('data', 'synthetic', rel), 'data/synthetic/') == rel
    os.symlink(tmp_path / 'data', tmp_path / 'link')                # a root given through a symlink
    assert common.path_key(str(tmp_path / 'data' / 'synthetic' / rel), str(tmp_path / 'link' / 'synthetic')) == rel


def test_predict_never_overwrites_a_second_image(tmp_path, monkeypatch):
    """`--predict CKPT a/000.png b/000.png` (two images, or a shell glob) is refused, not a heatmap
    written over b/000.png; default heatmaps go to the run's predict/ folder (not the working directory,
    perhaps a checkout) and keep the image's folder, as MVTec repeats 000.png per folder."""
    ckpt = os.path.join(toy(tmp_path, '--steps', '2'), 'ckpt.pt')
    for folder in ('a', 'b'):
        os.makedirs(tmp_path / folder)
        Image.fromarray(np.full((32, 32, 3), 60, np.uint8)).save(tmp_path / folder / '000.png')
    before = (tmp_path / 'b' / '000.png').read_bytes()
    with pytest.raises(UserError, match=r'usage: python eval.py --predict CKPT IMAGE \[NEW.png\] \[--category NAME\] '
                                        r'\[inference keys\]'):
        E.main(['--predict', ckpt, str(tmp_path / 'a' / '000.png'), str(tmp_path / 'b' / '000.png')])
    assert (tmp_path / 'b' / '000.png').read_bytes() == before
    monkeypatch.chdir(tmp_path)
    for folder in ('a', 'b', 'a'):                       # the second run of a rewrites its own heatmap
        E.main(['--predict', ckpt, str(tmp_path / folder / '000.png')])
    assert sorted(os.listdir(os.path.join(os.path.dirname(ckpt), 'predict'))) == ['a_000_heatmap.png', 'b_000_heatmap.png']
    E.main(['--predict', os.path.dirname(ckpt), str(tmp_path / 'a' / '000.png'), 'a_000_heatmap.png'])   # a run folder
    E.main(['--predict', ckpt, str(tmp_path / 'a' / '000.png'), 'a_000_heatmap.png'])   # an earlier heatmap: fine
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith('.png')) == ['a_000_heatmap.png']


def test_predict_on_a_class_conditioned_multi_class_model_needs_the_category(tmp_path):
    ckpt = os.path.join(toy(tmp_path, '--steps', '2'), 'ckpt.pt')            # category all
    img = tmp_path / 'one.png'
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    assert np.isfinite(E.main(['--predict', ckpt, str(img), str(tmp_path / 'u.png')])[0])   # unconditional
    c = common.read_checkpoint(ckpt)                                          # weights_only
    c['config']['class_cond'] = True                                          # as DeCo-Diff --class_cond
    torch.save(c, ckpt)
    with pytest.raises(UserError, match="name the image's category with --category: one of weave, grain"):
        E.main(['--predict', ckpt, str(img)])
    with pytest.raises(UserError, match='--category needs a value'):
        E.main(['--predict', ckpt, str(img), '--category'])
    with pytest.raises(UserError, match="not 'screw'"):
        E.main(['--predict', ckpt, str(img), '--category', 'screw'])
    with pytest.raises(UserError, match=r'unknown option --nois \(did you mean --noise\?\)'):
        E.main(['--predict', ckpt, str(img), '--category', 'grain', '--nois', '0.1'])    # not an output name
    with pytest.raises(UserError, match=r'usage: python eval.py --predict CKPT IMAGE \[NEW.png\] \[--category'):
        E.main(['--predict', '--category', 'grain', ckpt, str(img)])                  # options come last
    assert np.isfinite(E.main(['--predict', ckpt, str(img), str(tmp_path / 'h.png'), '--category', 'grain'])[0])


def test_a_new_method_file_is_evaluated_and_its_old_checkpoints_take_new_keys_defaults(tmp_path, capsys):
    """eval.py loads any method file a checkpoint names (toy_method is not one of common.METHODS, as a
    researcher's copy is not); a key added to the method after the checkpoint was saved takes its
    default, and may be overridden if it is an inference key."""
    assert 'toy_method' not in common.METHODS
    ckpt = os.path.join(toy(tmp_path, '--category', 'weave'), 'ckpt.pt')
    c = common.read_checkpoint(ckpt)                                          # weights_only
    del c['config']['noise']                                                  # saved before 'noise' existed
    torch.save(c, ckpt)
    plain = E.main([ckpt])
    assert f"predates --noise: it runs with --noise {toy_method.config['noise']!r}" in capsys.readouterr().out
    assert E.main([ckpt, '--noise', '0.1'])['config']['noise'] == 0.1
    model = E._load(ckpt)[0]
    del toy_method.Model.INFER_KEYS                                           # a method may have none
    try:
        assert E._load(ckpt)[0].cfg['noise'] == 0.0
        with pytest.raises(UserError, match='--noise cannot change without retraining; inference keys of toy_method: none'):
            E._load(ckpt, ['--noise', '0.1'])
    finally:
        toy_method.Model.INFER_KEYS = ('noise',)
    assert plain['metrics']['weave'] == E.evaluate(model, common.load_dataset(model.cfg, 'test'), quiet=True)['metrics']['weave']
    toy_method.main(['--out_dir', os.path.dirname(ckpt), '--resume', '--steps', '8'])   # and it resumes
    resumed = common.read_checkpoint(ckpt)
    assert resumed['config']['noise'] == 0.0 and resumed['step'] == 8


@pytest.mark.parametrize('bad', ['short score', '(B,1) score', 'numpy score', '(B,1,H,W) map', 'short map',
                                 'short extra score'])
def test_predict_breaking_the_contract_is_an_error_not_wrong_metrics(tmp_path, bad):
    model = E._load(os.path.join(toy(tmp_path, '--category', 'weave', '--steps', '1'), 'ckpt.pt'))[0]
    predict = model.predict

    def broken(batch):
        out = predict(batch)
        out['scores'] = dict(extra=out['score'][:-1] if bad == 'short extra score' else out['score'])
        out['score'] = dict(zip(['short score', '(B,1) score', 'numpy score'], [out['score'][:-1], out['score'][:, None],
                                                                               out['score'].numpy()])).get(bad, out['score'])
        out['map'] = dict(zip(['(B,1,H,W) map', 'short map'], [out['map'][:, None], out['map'][:-1]])).get(bad, out['map'])
        return out
    model.predict = broken
    with pytest.raises(UserError, match=r'toy_method.predict must return tensors map \(B,H,W\), score \(B,\)'):
        E.evaluate(model, common.load_dataset(model.cfg, 'test'), quiet=True)


def test_evaluation_is_batch_size_invariant_and_uses_only_image_cls_path(tmp_path):
    out = toy(tmp_path, '--category', 'grain')
    model, _ = common.load(os.path.join(out, 'ckpt.pt'), toy_method.Model, {'noise': 0.05})
    test = common.load_dataset(model.cfg, 'test')
    seen = []
    predict = model.predict
    model.predict = lambda b: seen.append(set(b)) or predict(b)
    r1 = E.evaluate(model, test, quiet=True)
    model.cfg['batch_size'] = 13
    r2 = E.evaluate(model, test, quiet=True)
    assert r1['metrics'] == r2['metrics'] and all(s == {'image', 'cls', 'path'} for s in seen)


def test_test_set_without_anomalies_reports_nan_image_metrics(tmp_path):
    out = toy(tmp_path, '--category', 'washer')
    model, _ = common.load(os.path.join(out, 'ckpt.pt'), toy_method.Model)
    test = common.load_dataset(model.cfg, 'test')
    normal = test.subset((test.labels == 0).nonzero()[:, 0])
    with pytest.warns(UserWarning, match='no anomalous'):
        r = E.evaluate(model, normal, str(tmp_path / 'n'), quiet=True)
    m = r['metrics']['washer']
    assert math.isnan(m['image_auroc']) and math.isnan(m['pixel_auroc']) and math.isnan(m['mad'])
    assert math.isnan(json.load(open(tmp_path / 'n' / 'results.json'))['metrics']['mean']['aupro'])


def test_postprocess_is_applied_per_category(tmp_path):
    out = toy(tmp_path)
    model, _ = common.load(os.path.join(out, 'ckpt.pt'), toy_method.Model)
    calls = []
    model.postprocess = lambda outs: calls.append(len(outs['score'])) or dict(outs, score=-outs['score'])
    r = E.evaluate(model, common.load_dataset(model.cfg, 'test'), quiet=True)
    assert calls == [100] * 4
    plain = json.load(open(os.path.join(out, 'results.json')))['metrics']
    for cat in common.SYNTHETIC:   # negated scores: AUROC mirrors, pixel metrics unchanged
        assert r['metrics'][cat]['image_auroc'] == pytest.approx(1 - plain[cat]['image_auroc'])
        assert r['metrics'][cat]['pixel_auroc'] == pytest.approx(plain[cat]['pixel_auroc'])


def test_a_paper_checkpoint_is_refused_on_an_implicit_cpu(tmp_path, monkeypatch, capsys):
    """--resume and --eval take the preset from the checkpoint: a paper run is not resumed (or
    evaluated) on a CPU nobody asked for, even when the command line alone would mean tiny."""
    out = toy(tmp_path, '--preset', 'paper', '--device', 'cpu', '--steps', '3', '--category', 'weave')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: False)
    for argv in (['--resume'], ['--eval'], ['--resume', '--steps', '5'], ['--eval', '--device', 'auto']):
        with pytest.raises(UserError, match='holds a paper-preset run and no GPU was found: pass --device cpu'):
            toy_method.main(['--out_dir', out, *argv])
    capsys.readouterr()
    toy_method.main(['--out_dir', out, '--eval', '--device', 'cpu'])           # asked for: allowed
    assert 'preset tiny' not in capsys.readouterr().out     # the checkpoint's preset, not the command line's


def test_compare_groups_seeds_and_flags_incomplete_each(tmp_path, capsys):
    for seed in ('0', '1'):                   # the same config, typed differently (steps 6 is the default)
        toy_method.main(['--out_dir', str(tmp_path / f's{seed}'), '--category', 'weave', '--seed', seed]
                        + ['--steps', '6'] * (seed == '1'))
    r = json.load(open(tmp_path / 's0' / 'results.json'))
    os.makedirs(tmp_path / 'each')
    json.dump(dict(r, category='each', missing=['grain']), open(tmp_path / 'each' / 'results.json', 'w'))
    os.makedirs(tmp_path / 's0' / 'eval_steps3')        # what `eval.py ckpt --<infer key> v` writes
    shutil.copy(tmp_path / 's0' / 'results.json', tmp_path / 's0' / 'eval_steps3')
    runs = E.compare(str(tmp_path))
    assert len(runs[('toy_method', 'synthetic', 'weave', 'tiny')]) == 2
    assert len(runs[('toy_method', 'synthetic', 'weave', 'tiny eval_steps3')]) == 1
    r1 = json.load(open(tmp_path / 's1' / 'results.json'))
    for name, seconds in (('eval_steps4', r1['train_seconds']), ('eval_steps3', r1['train_seconds'] / 2)):
        os.makedirs(tmp_path / 's1' / name)            # steps3: made before a --resume trained s1 further
        json.dump(dict(r1, train_seconds=seconds), open(tmp_path / 's1' / name / 'results.json', 'w'))
    labels = [k[3] for k in E.compare(str(tmp_path))]
    assert 'tiny eval_steps3 of an earlier checkpoint' in labels and 'tiny eval_steps4' in labels
    printed = capsys.readouterr().out
    assert 'INCOMPLETE' in printed and '+-' in printed
    os.makedirs(tmp_path / 'longer')                   # another config under the same preset: not a seed
    json.dump(dict(r, config=dict(r['config'], steps=99, noise=0.0123456789)), open(tmp_path / 'longer' / 'results.json', 'w'))
    os.makedirs(tmp_path / 'again')                    # a second run of seed 0, on another CPU: counted, flagged
    json.dump(dict(r, versions=dict(r['versions'], cpu='another CPU, AVX2, 2 threads')),
              open(tmp_path / 'again' / 'results.json', 'w'))
    runs = E.compare(str(tmp_path))
    rows = [k for k in runs if k[:3] == ('toy_method', 'synthetic', 'weave') and 'eval_' not in k[3]]
    assert sorted(len(runs[k]) for k in rows) == [1, 3]
    assert sorted(k[3] for k in rows) == ['tiny noise=0.0 steps=6', 'tiny noise=0.0123456789 steps=99']
    printed = capsys.readouterr().out                                        # labelled by what differs
    assert '(3 runs of 2 seeds) (2 CPUs)' in printed
    assert len({line.index('+-') for line in printed.splitlines()[1:]}) == 1   # columns aligned past long labels
    os.makedirs(tmp_path / 'older')                    # saved before a key was added: labelled by it
    json.dump(dict(r, config={k: v for k, v in r['config'].items() if k != 'noise'}),
              open(tmp_path / 'older' / 'results.json', 'w'))
    assert 'tiny noise=<absent> steps=6' in [k[3] for k in E.compare(str(tmp_path))]
    for name, change in (('bigger', dict(batch_size=64)), ('compiled', dict(compile=True, log_interval=7))):
        os.makedirs(tmp_path / name)       # trained with another batch size: another setting; compiled: the same
        json.dump(dict(r, seed=5, config=dict(r['config'], **change)), open(tmp_path / name / 'results.json', 'w'))
    labels = [k[3] for k in E.compare(str(tmp_path))]
    assert any('batch_size=64' in label for label in labels) and not any('compile' in label or 'log_' in label
                                                                         for label in labels)
    os.makedirs(tmp_path / 'oldrule')      # same config, older mask rule: a setting of its own, labelled so
    json.dump(dict(r, protocol=dict(r['protocol'], mask_rule='mask > 0')), open(tmp_path / 'oldrule' / 'results.json', 'w'))
    assert sum('mask_rule=mask > 0 ' in k[3] for k in E.compare(str(tmp_path))) == 1
    with pytest.raises(UserError, match='no results.json under'):
        E.compare(str(tmp_path / 'empty'))
    with pytest.raises(UserError, match='--compare takes one folder'):      # a second one is not ignored
        E.main(['--compare', str(tmp_path), str(tmp_path / 'oldrule')])


def test_cli_errors_are_one_line_with_exit_2(tmp_path):
    for argv, message in ((['nothing.pt'], 'error: no checkpoint at nothing.pt'),
                          (['--predict', 'a.pt'], 'error: usage: python eval.py --predict CKPT IMAGE'),
                          (['--predct', 'a.pt', 'b.png'], 'error: unknown command --predct: give a checkpoint, '),
                          (['--bench', 'nomethod'], None)):
        p = subprocess.run([sys.executable, os.path.join(ROOT, 'eval.py'), *argv], capture_output=True,
                           text=True, cwd=tmp_path)
        if message:
            assert p.returncode == 2 and p.stderr.startswith(message) and p.stderr.count('\n') == 1, p.stderr
        else:
            assert p.returncode == 2 and "cannot import the method 'nomethod'" in p.stderr, p.stderr
            assert p.stderr.count('\n') == 1 and 'lasb' in p.stderr and 'did you mean' not in p.stderr
    with pytest.raises(UserError, match=r'\(did you mean omiad\?\)$'):     # a typo gets the name it meant
        common.import_method('omaid.py')
    assert common.import_method('toy_method.py') is toy_method           # the file name works too


@pytest.mark.parametrize('method', common.METHODS)
def test_bench_costs_each_network_pass_once_and_counts_the_rest(method):
    """--bench runs each network once per input shape and multiplies by its call count, so that
    paper-scale models can be costed: the FLOPs must equal those of the whole predict, and the
    method's own forwards must be restored afterwards."""
    from torch.utils.flop_counter import FlopCounterMode
    module = __import__(method)
    r = E.bench(method, ['--device', 'cpu', '--networks_only'])
    cfg = common.get_config(module.config, module.PRESETS, ['--device', 'cpu'], module.__file__)
    model = module.Model(cfg).eval()
    x = dict(image=torch.rand(1, 3, cfg['image_size'], cfg['image_size']), cls=torch.zeros(1, dtype=torch.long),
             path=['bench/0'])
    with torch.no_grad(), FlopCounterMode(display=False) as full:
        out = model.predict(x)
    assert r['flops'] == full.get_total_flops() and r['nfe'] == out['nfe'] and r['ms'] == {}
    assert all(n['ms'] > 0 and n['calls'] >= 1 for n in r['networks'])
    with torch.no_grad():
        E._network_passes(model, x, torch.device('cpu'), reuse=True)
    assert not any('forward' in vars(m) for m in model.modules())


def test_bench_counts_parameters_flops_and_separates_network_time(capsys, monkeypatch):
    r = E.bench('toy_method', ['--device', 'cpu'])
    assert r['params'] == {'net': (3 * 9 * 8 + 8) + (8 * 9 * 3 + 3)}
    assert r['flops'] == 2 * 32 * 32 * (3 * 9 * 8 + 8 * 9 * 3)   # two 3x3 convolutions at 32x32, batch 1
    assert r['nfe'] == {'net': 1} and set(r['ms']) == {1, 32}
    assert [(n['name'], n['calls']) for n in r['networks']] == [('net', 1)]
    assert all(0 < net <= total for total, net in r['ms'].values())

    clock = fake_clock(monkeypatch)

    class Net(torch.nn.Conv2d):            # a network pass that costs 5 ms
        def forward(self, x):
            clock[0] += 0.005
            return super().forward(x)

    class Slow(torch.nn.Module):           # one network pass, then 20 ms of pipeline outside any network
        def __init__(self):
            super().__init__()
            self.net = Net(3, 3, 1)

        def predict(self, batch):
            out = self.net(batch['image'])
            clock[0] += 0.02
            return dict(map=out[:, 0], nfe={'net': 1})
    model, x = Slow(), torch.rand(1, 3, 8, 8)
    total, spent, passes, _ = E._network_passes(model, dict(image=x), torch.device('cpu'), reuse=False)
    assert (total, spent) == pytest.approx((0.025, 0.005), abs=1e-12)
    assert [(k[0], p[0]) for k, p in passes.items()] == [('net', 1)]


def test_a_multi_class_model_keeps_the_categories_it_was_trained_on(tmp_path):
    """run() records the categories in the checkpoint: evaluation keeps their class ids even when the
    data folder now lists others (a category dropped from the front shifted every id before), and
    --predict needs no dataset."""
    out = toy(tmp_path, '--steps', '1')
    cfg = common.read_checkpoint(out)['config']
    assert cfg['categories'] == list(common.SYNTHETIC)
    test = common.load_dataset(dict(cfg, categories=['grain', 'weave']), 'test')
    assert test.categories == ['grain', 'weave'] and test.cls[test.paths.index(next(
        p for p in test.paths if p.startswith('weave')))] == 1
    assert set(E.baselines(dict(cfg, categories=['grain']))['mean']['metrics']) == {'grain', 'mean'}   # same set
    img = tmp_path / 'one.png'
    Image.fromarray(test.images[0].numpy().transpose(1, 2, 0)).save(img)
    with mock.patch.object(common, 'categories', side_effect=AssertionError('the dataset was listed')):
        E.predict(os.path.join(out, 'ckpt.pt'), str(img), str(tmp_path / 'h.png'), ['--category', 'grain'])

# -----------------------------------------------------------------------------
# the protocol's numbers, each pinned against a hand computation


class FnModel(torch.nn.Module):
    """A stand-in method: predict is a given function of the batch."""

    def __init__(self, fn, **cfg):
        super().__init__()
        self.register_buffer('dummy', torch.zeros(1))
        self.cfg = dict(dict(method='fn_model', data='synthetic', category='all', preset='-', seed=0,
                             batch_size=4, eval_size=4), **cfg)
        self.fn = fn

    def predict(self, batch):
        return self.fn(batch)


def dataset(cats, size=4, msize=None):
    """cats: {name: [(image value array (size,size) or scalar, label, mask (msize,msize) or None), ...]}."""
    msize = msize or size
    images, masks, labels, cls, paths = [], [], [], [], []
    for ci, (cat, items) in enumerate(cats.items()):
        for j, (value, label, mask) in enumerate(items):
            images.append(np.broadcast_to(np.asarray(value, np.uint8), (3, size, size)))
            masks.append(np.zeros((1, msize, msize), np.uint8) if mask is None else np.asarray(mask, np.uint8)[None])
            labels.append(label)
            cls.append(ci)
            paths.append(f'{cat}/test/{"bad" if label else "good"}/{j:03d}.png')
    return common.ADDataset(np.stack(images), np.stack(masks), np.array(labels), np.array(cls), paths, list(cats),
                            {c: any(m is not None for _, _, m in items) for c, items in cats.items()})


def channel0(batch):
    m = batch['image'][:, 0]
    return dict(map=m, score=m.flatten(1).amax(1), nfe={})


# -----------------------------------------------------------------------------
# eval.py: _infer, evaluate, merge


def test_maps_are_resized_bilinearly_without_align_corners():
    """A 2x2 map [0, 1] per row at eval_size 4 is, by the half-pixel rule with edge clamping,
    [0, 1/4, 3/4, 1] per row (align_corners: thirds; nearest: 0 0 1 1)."""
    img = np.zeros((2, 2), np.uint8)
    img[:, 1] = 255
    outs = E._infer(FnModel(channel0), dataset({'a': [(img, 0, None)]}, size=2), 4, 4, dict(s=0.0, n=0, nfe={}))
    np.testing.assert_allclose(outs['map'][0], np.tile([0, 0.25, 0.75, 1], (4, 1)), rtol=0, atol=1e-6)


@pytest.mark.filterwarnings('ignore::UserWarning')   # undefined metrics of toy data
def test_ms_per_image_excludes_the_warm_up_and_the_last_smaller_batch(monkeypatch):
    """Predict costs 20 ms per image, and 400 ms more at each new batch shape (the warm-up's lazy
    init; on MPS a graph build). Two categories of 4 share one warm-up; a third of 2 is a smaller batch.
    ms_per_image must be 20 ms, not 20 + 400/8 (warm-up timed), 80 (per batch of 4) or 60 (the
    smaller batch timed)."""
    calls, clock = [], fake_clock(monkeypatch)

    def slow(batch):
        calls.append(len(batch['path']))
        clock[0] += 0.02 * len(batch['path']) + (0.4 if calls.count(calls[-1]) == 1 else 0)
        return channel0(batch)
    items = [(0, 0, None), (0, 0, None), (255, 1, None), (255, 1, None)]
    r = E.evaluate(FnModel(slow, batch_size=4), dataset({'a': items, 'b': items, 'c': items[1:3]}), quiet=True)
    assert calls == [4, 4, 4, 2]                           # one warm-up per evaluation, then one call per batch
    assert r['ms_per_image'] == pytest.approx(20)


def three_categories():
    mask = np.zeros((4, 4), np.uint8)
    mask[1:3, 1:3] = 1
    bright = mask * 255
    good, bad = (0, 0, None), (bright, 1, mask)
    flipped = [(255, 0, None), (100 * mask, 1, mask)]       # the normal image scores higher: AUROC 0
    return {'a': [good, bad], 'b': [good, bad, good], 'c': flipped}


@pytest.mark.filterwarnings('ignore::UserWarning')   # undefined metrics of toy data
def test_the_mean_row_is_the_mean_over_categories():
    """Image AUROC is 1, 1 and 0 in the three categories: the mean row says 2/3
    (a median would say 1), and every key of the mean row is the plain mean of the category rows."""
    r = E.evaluate(FnModel(channel0), dataset(three_categories()), quiet=True)
    m = r['metrics']
    assert [m[c]['image_auroc'] for c in 'abc'] == [1.0, 1.0, 0.0]
    assert m['mean']['image_auroc'] == pytest.approx(2 / 3, abs=1e-12)
    for k in common.METRICS + ('mad',):
        assert m['mean'][k] == pytest.approx(np.mean([m[c][k] for c in 'abc']), abs=1e-12), k


@pytest.mark.filterwarnings('ignore::UserWarning')   # undefined metrics of toy data
def test_extra_scores_get_their_own_image_auroc_per_category():
    """results['extra'][category][name]: the image AUROC of predict's scores[name], not of its score."""
    def two_scores(batch):
        out = channel0(batch)
        return dict(out, scores=dict(neg=-out['score'], same=out['score']))
    r = E.evaluate(FnModel(two_scores), dataset(three_categories()), quiet=True)
    for c in 'abc':
        assert r['extra'][c] == dict(neg=1 - r['metrics'][c]['image_auroc'], same=r['metrics'][c]['image_auroc'])


@pytest.mark.filterwarnings('ignore::UserWarning')   # undefined metrics of toy data
def test_a_category_with_an_undefined_metric_makes_the_mean_undefined():
    """A category without anomalies has NaN image metrics; the mean row must be NaN,
    not the mean of the other categories."""
    cats = {'a': three_categories()['a'], 'normal_only': [(0, 0, None), (10, 0, None)]}
    r = E.evaluate(FnModel(channel0), dataset(cats), quiet=True)
    assert r['metrics']['a']['image_auroc'] == 1.0 and np.isnan(r['metrics']['normal_only']['image_auroc'])
    assert np.isnan(r['metrics']['mean']['image_auroc']) and np.isnan(r['metrics']['mean']['mad'])


def test_merge_means_categories_means_ms_and_sums_training_time():
    """An 'each' run's summary: two runs over categories {a} and {b, c}, image AUROC 0.9, 0.6, 0.0
    -> mean 0.5 over the categories (not the median 0.6, nor with the runs' own mean rows); ms/image
    the mean, training time the sum."""
    def run(values, ms, seconds):
        metrics = {c: {k: v for k in common.METRICS + ('mad',)} for c, v in values.items()}
        metrics['mean'] = {k: 0.0 for k in common.METRICS + ('mad',)}
        return dict(method='m', config=dict(category='x'), metrics=metrics, extra={c: {} for c in values},
                    ms_per_image=ms, train_seconds=seconds)
    r = E.merge([run({'a': 0.9}, 10.0, 100.0), run({'b': 0.6, 'c': 0.0}, 20.0, 200.0)], 'each')
    assert set(r['metrics']) == {'a', 'b', 'c', 'mean'} and r['category'] == r['config']['category'] == 'each'
    assert r['metrics']['mean']['image_auroc'] == pytest.approx(0.5, abs=1e-12)
    assert r['ms_per_image'] == 15.0 and r['train_seconds'] == 300.0


# -----------------------------------------------------------------------------
# eval.py: the baselines


def test_zscore_baseline_divides_by_the_sample_std_plus_0_02():
    """Constant images,
    so the blur changes nothing and the score is the per-pixel value. Category a trains on 100 and 110
    (sample std 10/sqrt(2)), b on 100 and 100 (std 0); a test image of 130 scores
    (25/255) / (10/255/sqrt(2) + 0.02) and (30/255) / 0.02 with 'zscore', 25/255 and 30/255 with 'mean'."""
    train = dataset({'a': [(100, 0, None), (110, 0, None)], 'b': [(100, 0, None)] * 2}, size=32)   # normal images
    x = dict(image=torch.full((2, 3, 32, 32), 130 / 255), cls=torch.tensor([0, 1]))
    z = E.Baseline(dict(kind='zscore'), train).predict(x)['score']
    want = [(25 / 255) / (10 / 255 / np.sqrt(2) + 0.02), (30 / 255) / 0.02]
    np.testing.assert_allclose(z.numpy(), want, rtol=1e-5)
    mean = E.Baseline(dict(kind='mean'), train).predict(x)['score']
    np.testing.assert_allclose(mean.numpy(), [25 / 255, 30 / 255], rtol=1e-5)


def test_mean_baseline_is_the_channel_mean_blurred_at_sigma_2_scored_by_its_max():
    """One pixel off by 1 in one of
    three channels: the map is 1/3 times the 2-D Gaussian kernel (sigma 2, radius 8), whose peak is
    1/3 * w0^2 with w0 = 1 / sum_{|i|<=8} exp(-i^2/8); the map's mass stays 1/3."""
    train = dataset({'a': [(0, 0, None)] * 2}, size=32)
    image = torch.zeros(1, 3, 32, 32)
    image[0, 1, 16, 16] = 1.0
    out = E.Baseline(dict(kind='mean'), train).predict(dict(image=image, cls=torch.tensor([0])))
    w0 = 1 / sum(np.exp(-i ** 2 / 8) for i in range(-8, 9))
    assert out['score'].item() == pytest.approx(w0 ** 2 / 3, rel=1e-5)
    assert out['map'][0, 16, 16].item() == pytest.approx(w0 ** 2 / 3, rel=1e-5)
    assert out['map'].sum().item() == pytest.approx(1 / 3, rel=1e-5)


@pytest.mark.filterwarnings('ignore::UserWarning')   # undefined metrics of toy data
def test_baselines_use_the_train_split_and_are_cached_per_eval_size(monkeypatch):
    """Their statistics come from the training split (train/good minus validation), and a second
    eval_size is computed anew, not served from the first one's cache."""
    monkeypatch.setattr(E, '_BASELINES', {})
    seen = []

    class Recording(E.Baseline):
        def __init__(self, cfg, train):
            seen.append((cfg['eval_size'], len(train), sorted({p.split('/')[1] for p in train.paths}),
                         int(train.labels.sum())))
            super().__init__(cfg, train)
    monkeypatch.setattr(E, 'Baseline', Recording)
    cfg = common.data_defaults(dict(common.BASE_CONFIG, category='weave', eval_size=16))
    r16 = E.baselines(cfg)
    r8 = E.baselines(dict(cfg, eval_size=8))
    assert seen == [(16, 144, ['train'], 0)] * 2 + [(8, 144, ['train'], 0)] * 2   # 160 minus the 10% validation share
    assert r8['mean']['metrics']['weave'] != r16['mean']['metrics']['weave']


# -----------------------------------------------------------------------------
# eval.py: compare, evaluate_checkpoint


def _result(seed, auroc, **kw):
    mean = {k: 0.5 for k in common.METRICS + ('mad',)}
    mean['image_auroc'] = auroc
    return dict(dict(method='no_such_method', data='synthetic', category='weave', preset='tiny', seed=seed,
                     config=dict(seed=seed, steps=6), protocol=dict(mask_rule=common.MASK_RULE),
                     metrics=dict(weave=mean, mean=mean), versions=dict(cpu='x'), ms_per_image=1.0,
                     params=dict(total=1), train_seconds=60.0, nfe={}), **kw)


def test_compare_prints_mean_and_population_std_over_seeds(tmp_path, capsys):
    """I-AUROC 0.5 and 0.7 over two seeds is
    60.0 +- 10.0 (population std; the sample std would be 14.1)."""
    for seed, auroc in ((0, 0.5), (1, 0.7)):
        os.makedirs(tmp_path / f's{seed}')
        json.dump(_result(seed, auroc), open(tmp_path / f's{seed}' / 'results.json', 'w'))
    rows = E.compare(str(tmp_path))
    assert list(rows) == [('no_such_method', 'synthetic', 'weave', 'tiny')]
    line = capsys.readouterr().out.splitlines()[1]
    assert '   60.0+-10.0' in line and '   50.0+-0.0 ' in line
    os.makedirs(tmp_path / 'other')
    for text, error in (('{', 'JSONDecodeError'), ('{"a": 1}', "KeyError: 'method'")):   # truncated; another tool's
        open(tmp_path / 'other' / 'results.json', 'w').write(text)
        with pytest.raises(UserError, match=rf'other.results.json is not a results.json of this project \({error}'):
            E.compare(str(tmp_path))


def test_a_re_evaluated_checkpoint_reports_its_training_time(tmp_path, monkeypatch):
    """eval.py CKPT reports the training time saved in the checkpoint (not NaN)."""
    import toy_method
    monkeypatch.setattr(E, 'baselines', lambda cfg: {})
    out = str(tmp_path / 'run')
    toy_method.main(['--out_dir', out, '--category', 'weave', '--steps', '1', '--eval_size', '32'])
    r = E.main([out, '--out_dir', str(tmp_path / 'again')])
    seconds = common.read_checkpoint(out)['train_seconds']
    assert seconds > 0 and r['train_seconds'] == seconds
    assert json.load(open(tmp_path / 'again' / 'results.json'))['train_seconds'] == seconds


