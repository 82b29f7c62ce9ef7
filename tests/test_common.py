"""Tests of common.py: config parsing, data loaders, the frozen benchmark, Perlin synthesis,
metrics, checkpoints and the deterministic training stream. Offline, CPU, seeded."""
import copy
import hashlib
import os
import re
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

import common
from common import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -----------------------------------------------------------------------------
# config

DEFAULTS = dict(common.BASE_CONFIG, lr=1e-4, steps=10, ema=True, mults=(1, 2, 4))   # lr: a float
PRESETS = {'paper': dict(steps=1000), 'tiny': dict(steps=5)}


def cfg_of(*argv, file=__file__):
    return common.get_config(DEFAULTS, PRESETS, list(argv), file)


def test_config_forms_types_and_presets(capsys):
    cfg = cfg_of('--lr', '3e-4', '--steps=7', '--no-ema', '--resume', '--mults', '1,1,2', '--data-root', 'x')
    assert (cfg['lr'], cfg['steps'], cfg['ema'], cfg['resume']) == (3e-4, 7, False, True)
    assert cfg['mults'] == (1, 1, 2) and cfg['data_root'] == 'x' and isinstance(cfg['steps'], int)
    assert cfg['preset'] == 'tiny' and cfg['eval_size'] == 128          # auto -> tiny on synthetic
    assert cfg['out_dir'] == os.path.join('out', 'test_common_synthetic_all_tiny_s0')
    out = capsys.readouterr().out     # --resume: the checkpoint's preset is printed when it is loaded
    assert 'preset tiny' not in out and 'overriding: lr = 0.0003' in out
    assert 'note: --data synthetic is generated, not read from --data_root' in out     # a folder without --data
    cfg_of('--lr', '3e-4')
    assert 'preset tiny (auto)' in capsys.readouterr().out
    assert cfg_of('--steps', '8')['steps'] == 8                          # command line beats preset
    assert cfg_of('--seed', '9007199254740993')['seed'] == 2 ** 53 + 1 and cfg_of('--steps', '1e2')['steps'] == 100
    assert cfg_of('--lr', '1')['lr'] == 1.0 and isinstance(cfg_of('--lr', '1')['lr'], float)
    assert cfg_of('--preset', 'paper', '--device', 'cpu')['steps'] == 1000
    paper = cfg_of('--data', 'mvtec', '--device', 'cpu')
    assert paper['preset'] == 'paper' and paper['data_root'] == 'data/mvtec'
    with mock.patch.object(common.os, 'sep', '\\'):                  # a path typed on Windows is recorded with /,
        assert cfg_of('--data_root', 'data\\mvtec')['data_root'] == 'data/mvtec'     # so --compare sees one setting
    assert paper['eval_size'] == 256


@pytest.mark.parametrize('argv, message', [
    (['--lrr', '1'], 'unknown option --lrr (did you mean --lr?)'),
    (['--lr', 'fast'], "--lr expects float (default 0.0001), got 'fast'"),
    (['--steps', '1.5'], '--steps expects int'),
    (['--ema=maybe'], '--ema expects bool'),
    (['--mults', 'a,b'], '--mults expects tuple'),
    (['--lr'], '--lr needs a value'),
    (['--lr', '--steps', '3'], '--lr needs a value'),
    (['train'], "unexpected argument 'train'"),
    (['--preset', 'huge'], "unknown preset 'huge'"),
    (['--dtype', 'float16'], "--dtype must be float32 or bfloat16 (got 'float16')"),
    (['--batch_size', '0'], '--batch_size must be at least 1'),
    (['--image_size', '0'], '--image_size must be at least 1 (got 0)'),
    (['--heatmaps', '-1'], '--heatmaps must be at least 0 (got -1)'),
    (['--log_interval', '0'], '--log_interval must be at least 1 (got 0)'),    # a modulo by zero at step 1
    (['--ckpt_interval', '0'], '--ckpt_interval must be at least 1 (got 0)'),
    (['--num_workers', '-1'], '--num_workers must be at least 0 (got -1)'),
    (['--eval_size', '-1'], '--eval_size must be at least 0 (got -1)'),
    (['--seed', str(2 ** 64)], '--seed must lie between -2^63 and 2^63'),    # torch.manual_seed would overflow
    (['--lr', 'nan'], '--lr must be a finite number (got nan)'),              # Adam would raise a traceback
    (['--val_frac', '-0.2'], '0 <= val_frac < 1 (got -0.2)'),      # would swap the train and val shares
    (['--data', 'mvtech', '--preset', 'tiny', '--category', 'each'], "unknown data 'mvtech'"),   # not a KeyError in run()
    (['--train', '--eval'], '--eval only evaluates a saved run: give one of them'),
    (['--dtd_root', '/nonexistent'], 'no DTD images at /nonexistent'),
    (['--device', 'gpu'], "--device 'gpu': use auto, cpu, cuda, cuda:N or mps"),
] + ([] if torch.cuda.is_available() else [(['--device', 'cuda'], '--device cuda: no cuda device here; use --device cpu')]))
def test_config_errors(argv, message):
    with pytest.raises(UserError, match=re.escape(message)):
        cfg_of(*argv)


@pytest.mark.parametrize('argv, message', [
    (['--T', '0'], '--T must be at least 1 (got 0)'),
    (['--ch', '0'], '--ch must be at least 1 (got 0)'),                      # a U-Net of 0 parameters
    (['--num_res_blocks', '-1'], '--num_res_blocks must be at least 0 (got -1)'),   # recorded as -1, built as 0
    (['--ch_mult='], '--ch_mult needs one positive multiplier per U-Net level, e.g. 1,2,4 (got ())'),
    (['--ch_mult', '1,0'], '--ch_mult needs one positive multiplier per U-Net level'),
    (['--anomaly_p', '1.5'], 'need 0 <= --anomaly_p <= 1 and an opacity range 0 <= low <= high <= 1'),
    (['--anomaly_beta', '0.8,0.2'], 'opacity range 0 <= low <= high <= 1 for --anomaly_beta (got 0.5 and (0.8, 0.2))'),
    (['--anomaly_beta', '0.2,1.2'], 'opacity range 0 <= low <= high <= 1'),
])
def test_unet_schedule_and_perlin_keys_are_checked_for_every_method(argv, message):
    """The keys every method's U-Net and schedule have, and common.perlin_anomaly's, refused with one line
    where they would build an empty network or draw outside [0, 1]."""
    defaults = dict(DEFAULTS, T=1000, ch=8, ch_mult=(1, 2), num_res_blocks=1, anomaly_p=0.5, anomaly_beta=(0.2, 0.8))
    with pytest.raises(UserError, match=re.escape(message)):
        common.get_config(defaults, PRESETS, argv, __file__)
    ok = common.get_config(defaults, PRESETS, ['--T', '1', '--num_res_blocks', '0', '--anomaly_p', '1',
                                               '--anomaly_beta', '0.5,0.5'], __file__)    # the edges pass
    assert (ok['T'], ok['anomaly_beta']) == (1, (0.5, 0.5))


def test_a_shared_option_a_method_does_not_use_is_refused():
    import decodiff, diffusionad, inversion_ad, lasb, omiad
    for m, unused in ((diffusionad, 'backbone_weights'), (decodiff, 'backbone_weights'), (inversion_ad, 'dtd_root'),
                      (omiad, 'dtd_root')):
        with pytest.raises(UserError, match=f'--{unused} is a shared option that this method does not use'):
            common.get_config(m.config, m.PRESETS, [f'--{unused}', 'x'], m.__file__)
    assert all({'dtd_root', 'backbone_weights'} & set(m.config) for m in (diffusionad, decodiff, inversion_ad, omiad))
    assert {'dtd_root', 'backbone_weights'} <= set(lasb.config)


def test_paper_preset_refused_on_implicit_cpu(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: False)
    with pytest.raises(UserError, match='paper preset takes days on a CPU'):
        cfg_of('--data', 'mvtec', '--data_root', str(tmp_path))
    with pytest.raises(UserError, match='mvtec dataset not found at .*nowhere'):   # the data error first
        cfg_of('--data', 'mvtec', '--data_root', str(tmp_path / 'nowhere'))
    with pytest.raises(UserError, match='paper preset takes days on a CPU'):
        cfg_of('--data', 'mvtec', '--data_root', str(tmp_path), '--device', 'auto')   # typed, but not cpu
    assert cfg_of('--data', 'mvtec', '--device', 'cpu')['device'] == 'cpu'   # explicit: allowed
    assert cfg_of('--data', 'mvtec', '--preset', 'tiny')['device'] == 'cpu'


def test_tf32_is_allowed_where_a_cuda_device_is_picked(monkeypatch):
    """TF32 is set where every entry point picks its device (eval.py and --predict too, which never call
    dist_setup), so a checkpoint re-evaluated on a GPU runs at the precision its training run evaluated
    at; never on the CPU."""
    for flags in (torch.backends.cuda.matmul, torch.backends.cudnn):
        monkeypatch.setattr(flags, 'allow_tf32', False)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert common.pick_device() in ('cpu', 'mps') and not torch.backends.cuda.matmul.allow_tf32
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert common.pick_device() == 'cuda'
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


def test_torchrun_on_mps_is_a_clear_error(monkeypatch):
    """gloo cannot all-reduce MPS tensors: refused before a process group is joined."""
    monkeypatch.setenv('WORLD_SIZE', '2')
    with pytest.raises(UserError, match='torchrun on a Mac GPU'):
        common.dist_setup({'device': 'mps'})
    assert not torch.distributed.is_initialized()


def test_bfloat16_on_an_old_mac_gpu_is_an_error(monkeypatch):
    """Before macOS 14, MPS autocast drops bfloat16 with a warning and runs float32, while results.json would
    say bfloat16: refused instead."""
    monkeypatch.setattr(torch.backends.mps, 'is_macos_or_newer', lambda major, minor: False)
    with pytest.raises(UserError, match='needs macOS 14'):
        common._check_values(dict(dtype='bfloat16', device='mps'))
    common._check_values(dict(dtype='float32', device='mps'))
    common._check_values(dict(dtype='bfloat16', device='cpu'))


def test_help_lists_every_key_with_default_comment_and_presets(tmp_path, capsys):
    f = tmp_path / 'meth.py'
    f.write_text('config = dict(\n    lr=1e-4,        # AdamW learning rate\n    steps=10,  # optimiser steps\n)\n')
    with pytest.raises(SystemExit) as e:
        common.get_config(DEFAULTS, PRESETS, ['--help'], str(f), 'Doc title.\n\nmore')
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith('Doc title.')
    for key in DEFAULTS:
        assert f'--{key} ' in out
    assert 'AdamW learning rate' in out and 'paper: 1000, tiny: 5' in out
    assert 'seeds init, data order' in out                  # comments of common's shared keys


def test_cli_turns_user_errors_into_one_line_and_exit_2(capsys):
    def main():
        raise UserError('no checkpoint at x')
    with pytest.raises(SystemExit) as e:
        common.cli(main)
    assert e.value.code == 2 and capsys.readouterr().err == 'error: no checkpoint at x\n'

    def in_a_worker():   # how a DataLoader worker's UserError arrives: its traceback in the message
        raise UserError('Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent '
                        'call last):\n  File "common.py", line 1\ncommon.UserError: no DTD images at d\n')
    with pytest.raises(SystemExit):
        common.cli(in_a_worker)
    assert capsys.readouterr().err == 'error: no DTD images at d\n'


def test_ctrl_c_and_a_kill_end_in_one_line_and_leave_no_temporary_file(capsys, tmp_path):
    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        common.cli(interrupted)
    assert e.value.code == 130 and capsys.readouterr().err.startswith('interrupted (a training run keeps its last')
    code = ('import os, signal, common\n'      # SIGTERM (timeout, a scheduler) mid-write: the finally blocks run
            "common.cli(lambda: common.write_atomic('r.json', lambda f: os.kill(os.getpid(), signal.SIGTERM), 'w'))")
    done = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(common.__file__))))
    assert done.returncode == 143 and os.listdir(tmp_path) == [] and 'Traceback' not in done.stderr, done.stderr


def test_a_nan_on_any_rank_stops_every_rank(monkeypatch):
    loss = torch.tensor(0.5)
    common.check_finite(loss, 3, 'ckpt.pt')                              # finite, one process: no error
    monkeypatch.setattr(common, 'rank_world', lambda: (0, 2))
    monkeypatch.setattr(common.dist, 'all_reduce', lambda t, op: t.fill_(1.0))   # rank 1 saw a NaN
    with pytest.raises(UserError, match='loss is not finite at step 3 .here 0.5.: training stopped; no checkpoint '
                                        'was saved yet'):                        # (none in this folder)
        common.check_finite(loss, 3, 'no_such_dir/ckpt.pt')

# -----------------------------------------------------------------------------
# data loaders on small trees built in tmp_path


def _img(path, size=(40, 30), mode='RGB', value=100):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, value if mode in ('L', 'I') else (value,) * len(mode)).save(path)


def _mask(path, size=(40, 30), value=255):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    a = np.zeros(size[::-1], np.uint8)
    a[5:15, 10:20] = value
    Image.fromarray(a).save(path)


def _cfg(data, root, category='all', **kw):
    return dict(dict(data=data, data_root=str(root), category=category, image_size=32, eval_size=16,
                     seed=0, val_frac=0.25), **kw)


def mvtec_tree(root, cats=('bottle', 'screw')):
    for c in cats:
        _img(f'{root}/{c}/train/good/000.png', mode='L')                    # grayscale
        _img(f'{root}/{c}/train/good/001.png', mode='RGBA')                 # RGBA
        _img(f'{root}/{c}/train/good/002.png', size=(64, 20))               # non-square
        _img(f'{root}/{c}/train/good/003.jpg')                              # JPG
        Image.fromarray(np.full((30, 40), 30000, np.uint16)).save(f'{root}/{c}/train/good/004.png')  # 16 bit
        _img(f'{root}/{c}/test/good/000.png')
        _img(f'{root}/{c}/test/crack/000.png', value=200)
        _mask(f'{root}/{c}/ground_truth/crack/000_mask.png')
    return root


def test_run_checks_every_category_before_training(tmp_path):
    """A broken category (here a missing mask of screw, the second one) stops the run before any
    training, not after the first categories have trained."""
    root = mvtec_tree(tmp_path / 'data')
    os.remove(root / 'screw' / 'ground_truth' / 'crack' / '000_mask.png')
    trained = []
    cfg = cfg_of('--data', 'folder', '--data_root', str(root), '--category', 'each', '--device', 'cpu',
                 '--out_dir', str(tmp_path / 'out'))
    with pytest.raises(UserError, match='image/mask mismatch: .*screw'):
        common.run(dict(cfg, image_size=32, eval_size=16), lambda c: trained.append(c['category']), None)
    assert trained == []


def test_mvtec_like_loader(tmp_path):
    root = mvtec_tree(tmp_path / 'mvtec')
    test = common.load_dataset(_cfg('folder', root), 'test')
    assert test.categories == ['bottle', 'screw'] and len(test) == 4
    assert test.images.shape == (4, 3, 32, 32) and test.images.dtype == torch.uint8
    assert test.masks.shape == (4, 1, 16, 16) and set(test.masks.unique().tolist()) == {0, 1}
    assert test.labels.tolist() == [1, 0, 1, 0] and test.cls.tolist() == [0, 0, 1, 1]
    assert test.paths[0] == os.path.join('bottle', 'test', 'crack', '000.png')
    assert test.masks[0].sum() > 0 and test.masks[1].sum() == 0 and test.has_masks['bottle']
    s = test[0]
    assert s['image'].shape == (3, 32, 32) and 0 <= s['image'].min() and s['image'].max() <= 1
    train, val = (common.load_dataset(_cfg('folder', root, 'screw'), k) for k in ('train', 'val'))
    assert len(train) == 4 and len(val) == 1 and not set(train.paths) & set(val.paths)
    every = torch.cat([train.images, val.images])
    assert every.float().mean((1, 2, 3)).sort().values.tolist() == pytest.approx([100] * 4 + [117], abs=1)  # 16 bit scaled
    assert common.load_dataset(_cfg('folder', root, 'screw', seed=0), 'val').paths == val.paths


def test_mask_files_in_any_mode_are_binarised(tmp_path):
    for name, im in (('rgb', Image.new('RGB', (20, 20), (0, 0, 0))), ('la', Image.new('LA', (20, 20), (0, 255))),
                     ('p', Image.new('P', (20, 20), 0)), ('i16', Image.fromarray(np.zeros((20, 20), np.uint16)))):
        im.paste(2 if name == 'p' else (9, 0, 0) if name == 'rgb' else (7, 255) if name == 'la' else 5, (5, 5, 10, 10))
        im.save(tmp_path / f'{name}.png')
        m = common._read(str(tmp_path / f'{name}.png'), 20, mask=True)
        assert m.shape == (1, 20, 20) and m.sum() == 25 and m[0, 5:10, 5:10].all(), name
    soft = np.zeros((20, 20), np.uint8)                # an anti-aliased 0/255 mask: its 60-valued rim
    soft[4:11, 4:11], soft[5:10, 5:10] = 60, 255       # is outside (binarised at 0.5, not > 0)
    assert common._read(soft, 20, mask=True).sum() == 25
    soft[:] = 0                                        # the rule is read off the file: a resize that keeps
    soft[8:12, 8:12], soft[9:11, 9:11] = 60, 255       # only the rim of a small defect does not make the
    assert common._read(soft, 6, mask=True).sum() == 0  # rim a class-id defect (the defect is lost: a warning)
    for name, full, dtype, ext in (('w16', 65535, np.uint16, 'png'), ('f32', 1.0, np.float32, 'tif')):
        deep = np.zeros((20, 20), dtype)               # 16-bit and [0,1] float masks: 0.5 of their own scale
        deep[5:10, 5:10], deep[15, 15] = full, 0.39 * full
        Image.fromarray(deep).save(tmp_path / f'{name}.{ext}')
        assert common._read(str(tmp_path / f'{name}.{ext}'), 20, mask=True).sum() == 25, name


def test_masks_are_checked_against_their_images(tmp_path):
    root = mvtec_tree(tmp_path / 'mvtec', cats=('bottle',))
    gt = root / 'bottle' / 'ground_truth' / 'crack'
    _mask(f'{gt}/000.png')
    with pytest.raises(UserError, match='000.png has 2 masks: '):               # which one is meant?
        common.load_dataset(_cfg('folder', root), 'test')
    os.remove(gt / '000.png')
    _mask(f'{gt}/000_mask.png', size=(60, 60))                                # 40x30 image: would be stretched
    for check in (lambda c: common.load_dataset(c, 'test'), common.check_data):   # check_data: before training
        with pytest.raises(UserError, match='the mask .*000_mask.png is 60x60 but its image .*000.png is 40x30'):
            check(_cfg('folder', root))
    _mask(f'{gt}/000_mask.png', size=(80, 60))                                # the same shape, finer: fine
    common.load_dataset(_cfg('folder', root), 'test')
    _mask(f'{gt}/000_mask.png', value=0)                                      # e.g. the defect only in alpha
    with pytest.warns(UserWarning, match='1 masks of anomalous bottle images are empty or cover > 90%'):
        common.load_dataset(_cfg('folder', root), 'test')


def test_images_are_read_as_viewed_and_16_bit_pngs_scaled_on_any_pillow(tmp_path, monkeypatch):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = 200                                                          # bright left half, as stored
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6                                                         # a camera's "rotate 90 CW to view"
    im.save(tmp_path / 'rot.jpg', exif=exif, quality=95)
    x = common._read(str(tmp_path / 'rot.jpg'), 20)
    assert x[0, :8].mean() > 150 and x[0, 12:].mean() < 50                   # viewed: bright top half
    Image.fromarray(np.full((8, 8), 136, np.uint16)).save(tmp_path / 'dark16.png')   # 136 of 65535: nearly black
    opened = Image.open

    def open_as_pillow_10_2(f):                                              # 16-bit greyscale PNG -> mode 'I'
        im = opened(f).convert('I')
        im.format = 'PNG'
        return im
    monkeypatch.setattr(Image, 'open', open_as_pillow_10_2)
    assert common._read(str(tmp_path / 'dark16.png'), 8).max() == 1           # 136 / 257, not read as 8-bit 136


def test_folder_without_masks_gives_image_metrics_only(tmp_path):
    root = mvtec_tree(tmp_path / 'mpdd', cats=('bottle',))
    os.rename(root / 'bottle' / 'ground_truth', root / 'bottle' / 'gt_elsewhere')
    test = common.load_dataset(_cfg('folder', root), 'test')
    assert not test.has_masks['bottle'] and test.masks.sum() == 0
    with pytest.raises(UserError, match='no ground_truth folder'):     # MVTec itself needs masks
        common.load_dataset(_cfg('mvtec', root, 'bottle'), 'test')
    with pytest.warns(UserWarning, match='no ground-truth masks: the pixel metrics, AUPRO and mAD are NaN'):
        m = common.compute_metrics(test.labels.numpy(), np.arange(len(test), dtype=float))
    assert np.isnan(m['pixel_auroc']) and np.isnan(m['mad']) and not np.isnan(m['image_auroc'])


def test_btad_loader(tmp_path):
    root = tmp_path / 'btad'
    _img(f'{root}/01/train/ok/0000.bmp')
    _img(f'{root}/01/test/ok/0000.bmp')
    _img(f'{root}/01/test/ko/0001.bmp')
    _mask(f'{root}/01/ground_truth/ko/0001.png')
    test = common.load_dataset(_cfg('btad', root, '01'), 'test')
    assert test.labels.tolist() == [1, 0] and test.masks[0].sum() > 0
    with pytest.raises(UserError, match='has ok/, not good/: for BTAD use --data btad'):
        common.check_data(_cfg('folder', root))


def test_visa_raw_and_prepared_loaders(tmp_path):
    raw = tmp_path / 'visa'
    _img(f'{raw}/candle/Data/Images/Normal/0000.JPG', size=(60, 40))
    _img(f'{raw}/candle/Data/Images/Normal/0001.JPG', size=(60, 40))
    _img(f'{raw}/candle/Data/Images/Anomaly/000.JPG', size=(60, 40))
    _mask(f'{raw}/candle/Data/Masks/Anomaly/000.png', size=(60, 40), value=3)   # class id, not 255
    os.makedirs(raw / 'split_csv')
    (raw / 'split_csv' / '1cls.csv').write_text(
        'object,split,label,image,mask\n'
        'candle,train,normal,candle/Data/Images/Normal/0000.JPG,\n'
        'candle,test,normal,candle/Data/Images/Normal/0001.JPG,\n'
        'candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png\n')
    test = common.load_dataset(_cfg('visa', raw, 'candle'), 'test')
    assert test.labels.tolist() == [0, 1] and set(test.masks[1].unique().tolist()) == {0, 1}
    csv_path = raw / 'split_csv' / '1cls.csv'
    csv_path.write_bytes(b'\xef\xbb\xbf' + csv_path.read_bytes())             # re-saved by a spreadsheet: a BOM
    assert common.load_dataset(_cfg('visa', raw, 'candle'), 'test').labels.tolist() == [0, 1]
    os.remove(raw / 'candle/Data/Masks/Anomaly/000.png')
    with pytest.raises(UserError, match=r'1 files listed in .*1cls.csv are missing, e.g. .*Anomaly/000.png'):
        common.check_data(_cfg('visa', raw, 'candle'))                        # before training, not after
    csv_path.write_text('object;split;label;image;mask\n')
    with pytest.raises(UserError, match='needs the columns object,split,label,image,mask'):
        common.check_data(_cfg('visa', raw, 'candle'))
    prepared = tmp_path / 'visa_1cls'
    _img(f'{prepared}/candle/train/good/0000.JPG')
    _img(f'{prepared}/candle/test/good/0001.JPG')
    _img(f'{prepared}/candle/test/bad/000.JPG')
    _mask(f'{prepared}/candle/ground_truth/bad/000.png', value=1)              # mask = image stem
    test = common.load_dataset(_cfg('visa', prepared, 'candle'), 'test')
    assert test.labels.tolist() == [1, 0] and test.masks[0].sum() > 0


def test_loader_errors(tmp_path):
    root = mvtec_tree(tmp_path / 'mvtec', cats=('bottle',))
    with pytest.raises(UserError, match='mvtec dataset not found at .*download MVTec AD from https'):
        common.load_dataset(_cfg('mvtec', tmp_path / 'nowhere', 'bottle'), 'test')
    with pytest.raises(UserError, match="unknown category 'botle' for folder \\(did you mean 'bottle'\\?\\); valid: all, each, bottle"):
        common.load_dataset(_cfg('folder', root, 'botle'), 'test')
    with pytest.raises(UserError, match="unknown data 'mvtech'"):
        common.load_dataset(_cfg('mvtech', root), 'test')
    with pytest.raises(UserError, match=r'has no cable folder, only 1 of the 15 mvtec categories \(bottle\): extract'):
        common.load_dataset(_cfg('mvtec', root, 'cable'), 'test')               # a partial copy
    _img(f'{tmp_path}/other/widget/train/good/000.png')
    with pytest.raises(UserError, match='has no bottle folder, so it is not mvtec: .*use --data folder'):
        common.load_dataset(_cfg('mvtec', tmp_path / 'other', 'bottle'), 'test')
    with pytest.raises(UserError, match='no category folders .* pass its parent as --data_root and --category bottle'):
        common.load_dataset(_cfg('folder', root / 'bottle', 'all'), 'test')       # one category's folder
    os.makedirs(root / 'gizmo' / 'test')                                        # no train/: not a category, said so
    with pytest.warns(UserWarning, match='gizmo have no train/ folder, so they are not categories'):
        assert common.categories('folder', str(root)) == ('bottle',)
    os.remove(root / 'bottle' / 'ground_truth' / 'crack' / '000_mask.png')
    with pytest.raises(UserError, match='image/mask mismatch: .*crack/000.png has no mask 000_mask.png'):
        common.load_dataset(_cfg('mvtec', root, 'bottle'), 'test')
    (root / 'bottle' / 'test' / 'crack' / '000.png').write_bytes(b'not a png')
    _mask(f'{root}/bottle/ground_truth/crack/000_mask.png')
    for check in (lambda c: common.load_dataset(c, 'test'), common.check_data):
        with pytest.raises(UserError, match='cannot read .*crack/000.png'):
            check(_cfg('mvtec', root, 'bottle'))
    for f in (root / 'bottle' / 'train' / 'good').iterdir():
        f.unlink()
    with pytest.raises(UserError, match='no images in .*train/good'):
        common.load_dataset(_cfg('mvtec', root, 'bottle'), 'train')
    with pytest.raises(UserError, match='val split of weave is empty'):
        common.load_dataset(_cfg('synthetic', '', 'weave', val_frac=0.0), 'val')

# -----------------------------------------------------------------------------
# the frozen synthetic benchmark

# sha256 over all arrays, labels and paths of every category and split (SYNTHETIC_VERSION 1)
SYNTHETIC_SHA256 = '88335344ca1e21b0ad6fe78839eb9e884ffc147b993c98a86a4579fdc318f955'


def test_synthetic_benchmark_is_frozen():
    h = hashlib.sha256()
    for cat in common.SYNTHETIC:
        for split in ('train', 'test'):
            images, masks, labels, paths = common.synthetic(cat, split)
            for a in (images, masks, labels.astype(np.int64)):
                h.update(np.ascontiguousarray(a).tobytes())
            h.update('\n'.join(paths).encode())
    assert common.SYNTHETIC_VERSION == 1
    assert h.hexdigest() == SYNTHETIC_SHA256, 'the frozen benchmark changed: methods were measured on v1'


def test_synthetic_benchmark_shapes_and_defects():
    for cat in common.SYNTHETIC:
        images, masks, labels, paths = common.synthetic(cat, 'test')
        assert images.shape == (100, 3, 128, 128) and images.dtype == np.uint8
        assert labels.sum() == 60 and (masks[labels == 0] == 0).all()
        areas = masks[labels == 1].reshape(60, -1).sum(1)
        assert areas.min() >= 30, 'every defect covers >= 30 px (128x128)'
        kinds = {p.split('/')[2] for p in paths}
        assert kinds == set(common.DEFECTS) | {'good'}
        train = common.synthetic(cat, 'train')
        assert train[0].shape == (160, 3, 128, 128) and train[2].sum() == 0
        assert len({x.tobytes() for x in train[0]}) == 160                # every normal image differs

# -----------------------------------------------------------------------------
# Perlin anomaly synthesis


def _sample(size=64):
    g = torch.Generator().manual_seed(0)
    return dict(image=torch.rand(3, size, size, generator=g), mask=torch.zeros(1, 16, 16), label=0,
                cls=0, path='x')


def test_perlin_noise_range_and_any_size():
    n = common.perlin_noise(np.random.default_rng(0), 50, 70, (4, 8))
    assert n.shape == (50, 70) and np.abs(n).max() <= np.sqrt(2) * 1.01 and n.std() > 0.1


def test_perlin_noise_matches_a_pixel_loop_with_the_quintic_fade():
    h, w, res = 6, 8, (2, 2)
    angles = np.random.default_rng(5).uniform(0, 2 * np.pi, (res[0] + 1, res[1] + 1))   # its first draws
    fade = lambda t: 6 * t ** 5 - 15 * t ** 4 + 10 * t ** 3
    want = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            y, x = i * res[0] / h, j * res[1] / w
            y0, x0, fy, fx = int(y), int(x), y % 1, x % 1
            dot = lambda dy, dx: (np.cos(angles[y0 + dy, x0 + dx]) * (fy - dy)
                                  + np.sin(angles[y0 + dy, x0 + dx]) * (fx - dx))
            top, bottom = dot(0, 0) + fade(fx) * (dot(0, 1) - dot(0, 0)), dot(1, 0) + fade(fx) * (dot(1, 1) - dot(1, 0))
            want[i, j] = np.sqrt(2) * (top + fade(fy) * (bottom - top))
    np.testing.assert_allclose(common.perlin_noise(np.random.default_rng(5), h, w, res), want, rtol=0, atol=1e-12)


def test_perlin_anomaly_properties():
    x = _sample()
    coverages = []
    for seed in range(40):
        out = common.perlin_anomaly(x, np.random.default_rng(seed), p=1.0, beta=(0.2, 0.8))
        m = out['mask']
        assert m.shape == (1, 64, 64) and set(m.unique().tolist()) <= {0.0, 1.0}
        assert out['label'] == int(m.any())
        assert torch.equal(out['image'] * (1 - m), x['image'] * (1 - m))   # outside: untouched
        assert out['image'].min() >= 0 and out['image'].max() <= 1
        assert (out['image'] - x['image']).abs()[m.expand(3, -1, -1) > 0].mean() > 0.01
        coverages.append(m.mean().item())
    assert np.mean([c > 0 for c in coverages]) > 0.9 and max(coverages) > 5 * min(coverages)  # scales vary
    same = [common.perlin_anomaly(x, np.random.default_rng(7), p=1.0)['image'] for _ in range(2)]
    assert torch.equal(*same)                                                # a pure function of rng
    labels = [common.perlin_anomaly(x, np.random.default_rng(s), p=0.5)['label'] for s in range(200)]
    assert 0.4 < np.mean(labels) < 0.6
    assert common.perlin_anomaly(x, np.random.default_rng(0), p=0.0)['label'] == 0
    fg = np.zeros((64, 64))
    fg[:, :32] = 1
    for s in range(10):
        assert common.perlin_anomaly(x, np.random.default_rng(s), p=1.0, fg=fg)['mask'][0, :, 32:].sum() == 0


def test_perlin_anomaly_blend_is_eq_12(monkeypatch):
    monkeypatch.setattr(common, '_appearance', lambda image, rng, dtd, dtd_self: np.full_like(image, 255))
    x = _sample()
    out = common.perlin_anomaly(x, np.random.default_rng(3), p=1.0, beta=(0.8, 0.8))   # b weighs the image
    m = out['mask'].expand(3, -1, -1) > 0
    assert m.any() and torch.allclose(out['image'][m], 0.8 * x['image'][m] + 0.2, atol=1e-6)


def test_perlin_anomaly_mask_threshold_is_one_half(monkeypatch):
    for level, hit in ((0.45, False), (0.55, True)):
        monkeypatch.setattr(common, 'perlin_noise', lambda rng, h, w, res: np.full((h, w), level))
        out = common.perlin_anomaly(_sample(), np.random.default_rng(0), p=1.0)
        assert bool(out['mask'].any()) == hit and out['label'] == int(hit)


def test_dtd_missing_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match='no DTD images'):
        for s in range(20):
            common.perlin_anomaly(_sample(), np.random.default_rng(s), p=1.0, dtd_root=str(tmp_path))
    for s in range(5):                 # dtd_self=1: always a self copy, the (empty) DTD folder is never read
        rng = np.random.default_rng(s)
        assert common.perlin_anomaly(_sample(), rng, p=1.0, dtd_root=str(tmp_path), dtd_self=1.0)['label'] == 1

def test_folders_with_glob_characters_are_read(tmp_path):
    """A dataset or DTD folder named like 'mvtec [copy]' is a literal path, not a glob pattern."""
    folder = tmp_path / 'set [1]'
    (folder / 'images' / 'banded').mkdir(parents=True)
    for name in ('a.png', 'images/banded/b.jpg'):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(folder / name)
    assert common._images(str(folder)) == [str(folder / 'a.png')]
    assert common._dtd_files(str(folder)) == [str(folder / 'images' / 'banded' / 'b.jpg')]


# -----------------------------------------------------------------------------
# metrics


def test_image_metrics_match_scikit_learn_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.random(300) < 0.4
        s = np.round(rng.random(300) + 0.4 * y, 1)                           # many ties
        m = common.image_metrics(y, s)
        p, r, _ = precision_recall_curve(y, s)
        f1 = np.max(2 * p * r / np.maximum(p + r, 1e-12))
        assert m['image_auroc'] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert m['image_ap'] == pytest.approx(average_precision_score(y, s), abs=1e-12)
        assert m['image_f1max'] == pytest.approx(f1, abs=1e-12)


def test_image_metrics_take_any_array_layout():
    """A reversed (negative-stride) view scores as the same labels and scores in order."""
    y, s = np.array([0, 1, 0, 1, 1]), np.array([0.1, 0.9, 0.4, 0.35, 0.8])
    assert common.image_metrics(y[::-1], s[::-1]) == common.image_metrics(y, s)


def test_pixel_metrics_match_scikit_learn():
    rng = np.random.default_rng(1)
    masks = np.zeros((6, 20, 20), bool)
    masks[:3, 5:12, 4:9] = True
    maps = np.round(rng.random((6, 20, 20)) + 0.5 * masks, 2).astype(np.float32)
    m = common.pixel_metrics(masks, maps)
    assert m['pixel_auroc'] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert m['pixel_ap'] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12)
    p, r, _ = precision_recall_curve(masks.ravel(), maps.ravel())
    assert m['pixel_f1max'] == pytest.approx(np.max(2 * p * r / np.maximum(p + r, 1e-12)), abs=1e-12)


def test_all_reduce_grads_averages_in_buckets_and_counts_a_missing_gradient_as_zero(monkeypatch):
    # rank 0 of 2; every gradient of the other rank is 3 (b has none here, so it counts as 0)
    calls = []
    monkeypatch.setattr(common, 'rank_world', lambda: (0, 2))
    monkeypatch.setattr(common.dist, 'all_reduce', lambda t: calls.append(t.numel()) or t.add_(3.0))
    n = 2 ** 23
    a, b, c = (torch.nn.Parameter(torch.zeros(k)) for k in (n, n, 2))
    frozen = torch.nn.Parameter(torch.zeros(4), requires_grad=False)
    a.grad, c.grad = torch.full((n,), 1.0), torch.tensor([5.0, 7.0])
    common.all_reduce_grads([a, frozen, b, c])
    assert calls == [2 * n, 2]          # a and b fill one bucket of 2^24, c starts the next; frozen skipped
    assert torch.equal(a.grad, torch.full((n,), 2.0)) and torch.equal(b.grad, torch.full((n,), 1.5))
    assert torch.equal(c.grad, torch.tensor([4.0, 5.0])) and frozen.grad is None


def _aupro_reference(masks, maps, limit):
    """Brute force: every distinct score is a threshold; PRO = mean over 8-connected regions of
    the covered fraction, FPR over all normal pixels; (0,0) and (1,1) added; official trapezoid."""
    from scipy import ndimage
    regions = []
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, np.ones((3, 3)))
        regions += [(i, lab == k) for k in range(1, n + 1)]
    fprs, pros = [0.0], [0.0]
    for th in np.unique(maps)[::-1]:
        pred = maps >= th
        fprs.append((pred & ~masks).sum() / (~masks).sum())
        pros.append(np.mean([(pred[i] & r).sum() / r.sum() for i, r in regions]))
    return common.trapezoid(fprs + [1.0], pros + [1.0], x_max=limit) / limit


def test_aupro_reference_values():
    preds = (np.arange(2800) / 2800).reshape(1, 400, 7)
    for cols in ([3], [1, 3, 5]):
        gt = np.zeros((1, 400, 7))
        gt[:, :, cols] = 1
        assert common.aupro(gt, preds, limit=1 / 3) == pytest.approx(1 / 6, abs=1e-3)
    assert common.trapezoid([0, 0.5, 1], [0, 0.5, 1], x_max=0.3) == pytest.approx(0.045, abs=1e-12)
    assert common.trapezoid([0, 0.3, 1], [0, 0.5, 1], x_max=0.3) == pytest.approx(0.075, abs=1e-12)
    rng = np.random.default_rng(2)
    masks = np.zeros((4, 16, 16), bool)
    masks[0, 2:6, 2:6] = masks[0, 10:14, 9:15] = masks[2, 4:12, 1:4] = True   # 3 regions
    maps = np.round(rng.random((4, 16, 16)) + 0.4 * masks, 2)
    for limit in (0.3, 0.05, 1.0):
        assert common.aupro(masks, maps, limit) == pytest.approx(_aupro_reference(masks, maps, limit), abs=1e-12)
    assert common.pixel_metrics(masks, maps)['aupro'] == pytest.approx(common.aupro(masks, maps), abs=1e-12)
    masks = np.zeros((1, 8, 8), bool)       # two squares touching at a corner: ONE region (8-connected)
    masks[0, 0:2, 0:2] = masks[0, 2:6, 2:6] = True
    maps = np.zeros((1, 8, 8), np.float32)
    maps[0, 0:2, 0:2] = 1.0                 # the small one found, no false positive: PRO 4/20 at FPR 0,
    assert common.aupro(masks, maps) == pytest.approx(0.32, abs=1e-12)   # then to (1, 1): (0.2 + 0.44) / 2


def test_perfect_and_constant_maps():
    masks = np.zeros((3, 8, 8), bool)
    masks[1, 2:5, 2:5] = True
    perfect = common.compute_metrics([0, 1, 0], [0.1, 0.9, 0.2], masks, masks.astype(np.float32))
    assert all(perfect[k] == pytest.approx(1.0) for k in common.METRICS) and perfect['mad'] == pytest.approx(1.0)
    with pytest.warns(UserWarning, match='every score is the same'):
        const = common.compute_metrics([0, 1, 0], [1, 1, 1], masks, np.ones((3, 8, 8)))
    assert const['image_auroc'] == 0.5 and const['pixel_auroc'] == 0.5
    assert const['pixel_ap'] == pytest.approx(masks.mean())
    assert const['aupro'] == pytest.approx(0.15)      # the diagonal from (0,0) to (1,1) up to 0.3
    p = masks.mean()                                  # mAD: the mean of seven different values here
    assert const['mad'] == pytest.approx((0.5 + 1 / 3 + 0.5 + 0.5 + p + 2 * p / (1 + p) + 0.15) / 7)


def test_undefined_metrics_are_nan_with_a_warning():
    masks = np.zeros((2, 8, 8), bool)
    with pytest.warns(UserWarning, match='no anomalous'):
        m = common.compute_metrics([0, 0], [0.1, 0.3], masks, np.random.rand(2, 8, 8))
    assert np.isnan(m['image_auroc']) and np.isnan(m['pixel_auroc']) and np.isnan(m['aupro'])
    assert np.isnan(m['mad'])
    with pytest.warns(UserWarning, match='non-finite'):
        assert np.isnan(common.image_metrics([0, 1], [0.1, np.nan])['image_auroc'])
    with pytest.warns(UserWarning, match='no ground-truth masks'):               # no masks: image only
        assert np.isnan(common.compute_metrics([0, 1], [0.1, 0.3])['pixel_ap'])


def test_masks_and_maps_of_different_sizes_are_an_error():
    masks = np.zeros((2, 4, 5), bool)
    masks[0, 1:3, 1:3] = True
    for metric in (common.pixel_metrics, common.aupro):       # not numbers over misaligned pixels
        with pytest.raises(ValueError, match='40 labels but 32 scores'):
            metric(masks, np.random.rand(2, 4, 4))


def test_gaussian_blur_equals_scipy_gaussian_filter():
    from scipy import ndimage
    x = torch.rand(2, 3, 20, 23, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for sigma in (0.7, 2.0, 6.0):          # 6.0: the kernel (radius 24) is wider than the image
        ref = [[ndimage.gaussian_filter(x[b, c].numpy(), sigma) for c in range(3)] for b in range(2)]
        assert np.abs(common.gaussian_blur(x, sigma).numpy() - np.array(ref)).max() < 1e-12
    assert torch.equal(common.gaussian_blur(x, 0), x)


# -----------------------------------------------------------------------------
# seeding, generators and the training stream


def test_generators_and_sample_noise_are_pure_functions_of_keys():
    assert torch.equal(torch.randn(3, generator=common.generator(0, 1, 2)),
                       torch.randn(3, generator=common.generator(0, 1, 2)))
    assert not torch.equal(torch.randn(3, generator=common.generator(0, 1, 2)),
                           torch.randn(3, generator=common.generator(0, 1, 3)))
    a = common.sample_noise((2, 4), 0, ['a', 'b', 'c'])
    b = common.sample_noise((2, 4), 0, ['c', 'a'])
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1])              # batch-independent
    assert not torch.equal(a[0], common.sample_noise((2, 4), 1, ['a'])[0])   # seed matters


def test_a_generator_for_a_cuda_device_lives_there_and_any_other_on_the_cpu(monkeypatch):
    made, real = [], torch.Generator
    monkeypatch.setattr(torch, 'Generator', lambda device: made.append(torch.device(device)) or real())
    for device in ('cpu', 'mps', 'cuda:1', torch.device('cuda')):
        common.generator(0, 1, device=device)
    assert made == [torch.device('cpu'), torch.device('cpu'), torch.device('cuda:1'), torch.device('cuda')]


def _stream(cfg, start, n, transform=None):
    data = common.load_dataset(cfg, 'train')
    it = common.train_batches(data, cfg, start, transform)
    return [next(it) for _ in range(n)]


def test_training_stream_resumes_exactly_and_covers_epochs():
    import functools
    cfg = dict(_cfg('synthetic', '', 'weave', image_size=32, val_frac=0.1), batch_size=8,
               num_workers=0, device='cpu')
    synth = functools.partial(common.perlin_anomaly, p=0.5)
    full = _stream(cfg, 0, 6, synth)
    tail = _stream(cfg, 3, 3, synth)
    for a, b in zip(full[3:], tail):
        assert a['path'] == b['path'] and torch.equal(a['image'], b['image']) and torch.equal(a['mask'], b['mask'])
    paths = [p for b in _stream(cfg, 0, 18) for p in b['path']]             # 144 = 18 x 8: one epoch
    assert len(set(paths)) == 144


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')   # the loader, dropped after 3
@pytest.mark.parametrize('start', ['fork', 'spawn'])      # batches, at times stops a worker still prefetching
def test_worker_processes_load_the_batches_of_the_main_process(start):
    """--num_workers gives the batches of 0, so the same weights: with fork (Linux) and spawn
    (macOS, Windows, and forkserver, Python 3.14's default on Linux, which pickles the same way)."""
    import functools
    import torch.multiprocessing as mp
    cfg = dict(_cfg('synthetic', '', 'washer', image_size=32, val_frac=0.1), batch_size=4, device='cpu')
    synth = functools.partial(common.perlin_anomaly, p=0.5)
    main = _stream(dict(cfg, num_workers=0), 2, 3, synth)
    before = mp.get_start_method()
    mp.set_start_method(start, force=True)
    try:
        workers = _stream(dict(cfg, num_workers=2), 2, 3, synth)
    finally:
        mp.set_start_method(before, force=True)
    for a, b in zip(main, workers):
        assert a['path'] == b['path'] and torch.equal(a['image'], b['image']) and torch.equal(a['mask'], b['mask'])
    assert sum(b['label'].sum() for b in main) > 0                 # some anomalies were pasted


def test_batch_size_must_divide_over_ranks(monkeypatch):
    monkeypatch.setattr(common, 'rank_world', lambda: (0, 2))
    with pytest.raises(UserError, match='--batch_size 3 must be divisible by the 2 ranks'):
        common.train_batches([0] * 4, dict(batch_size=3, seed=0, num_workers=0, device='cpu'), 0)


def test_rank_shares_reassemble_the_global_batch():
    keys = lambda rank, world: next(common._batch_keys(50, 8, 0, 5, rank, world))   # noqa: E731
    assert keys(0, 2) + keys(1, 2) == keys(0, 1)

# -----------------------------------------------------------------------------
# checkpoints


class Tiny(torch.nn.Module):
    INFER_KEYS = ('k',)

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.lin = torch.nn.Linear(3, cfg.get('width', 2))
        self.register_buffer('stat', torch.zeros(2))


def test_versions_flag_a_file_the_commit_does_not_hold(tmp_path):
    """A copied method file is not in the commit, so results it gives are not of that commit: '-dirty'."""
    clean = common.versions.__wrapped__()['git']
    if clean == 'unknown' or clean.endswith('-dirty'):   # no git (a release archive), or work in progress
        pytest.skip('needs git and a clean work tree (as a CI checkout is)')
    probe = os.path.join(ROOT, 'my_copied_method_probe.py')
    open(probe, 'w').close()
    try:
        commit = common.versions.__wrapped__()['git']
    finally:
        os.remove(probe)
    assert commit == clean + '-dirty'


def test_save_is_atomic_and_load_restores_and_checks(tmp_path):
    path = str(tmp_path / 'ckpt.pt')
    m = Tiny(dict(width=2, k=1, preset='tiny'))
    m.stat += 3
    common.save(path, m, step=5, train_seconds=1.5)
    assert os.listdir(tmp_path) == ['ckpt.pt']                                 # no temporary left
    with mock.patch.object(torch, 'save', side_effect=KeyboardInterrupt):     # killed mid-write
        with pytest.raises(KeyboardInterrupt):
            common.save(path, m, step=6)
    assert os.listdir(tmp_path) == ['ckpt.pt'] and torch.load(path, weights_only=True)['step'] == 5
    m2, ckpt = common.load(path, Tiny, {'k': 4})
    assert ckpt['step'] == 5 and ckpt['method'] == 'test_common' and m2.cfg['k'] == 4
    assert torch.equal(m2.lin.weight, m.lin.weight) and torch.equal(m2.stat, m.stat)
    assert set(ckpt['versions']) >= {'python', 'torch', 'torchvision', 'timm', 'git', 'cpu', 'gpu'}
    assert ckpt['versions']['gpu'] == ''                          # this process used no GPU
    cap = torch.backends.cpu.get_cpu_capability()   # what makes a seed reproduce only on the same kind of CPU
    assert ckpt['versions']['cpu'].endswith(f', {cap}, {torch.get_num_threads()} threads')
    with pytest.raises(UserError, match='--width cannot change without retraining; inference keys of test_common: k'):
        common.load(path, Tiny, {'width': 3})
    torch.save(dict(torch.load(path, weights_only=True), config=dict(width=3, k=1)), path)
    with pytest.raises(UserError, match='does not match this version of test_common.py'):
        common.load(path, Tiny)


def test_a_file_held_open_elsewhere_is_replaced_when_released_or_named_in_an_error(tmp_path, monkeypatch):
    """Windows refuses to replace a file another program has open (PermissionError, as a virus scanner
    makes for a moment): the rename is retried, and in the end a one-line error keeps the old file."""
    path, real_replace, waits = str(tmp_path / 'results.json'), os.replace, []
    common.write_atomic(path, lambda f: f.write('old'), 'w')
    refusals = iter([PermissionError(13, 'Access is denied')] * 2)
    def held_twice(a, b):
        err = next(refusals, None)
        if err:
            raise err
        real_replace(a, b)
    monkeypatch.setattr(common.time, 'sleep', waits.append)
    monkeypatch.setattr(common.os, 'replace', held_twice)
    common.write_atomic(path, lambda f: f.write('new'), 'w')
    assert open(path).read() == 'new' and waits == [0.1, 0.4] and os.listdir(tmp_path) == ['results.json']
    def held(a, b):
        raise PermissionError(13, 'Access is denied')
    monkeypatch.setattr(common.os, 'replace', held)
    with pytest.raises(UserError, match=r'cannot replace .*results.json \(Access is denied\): is it open in another'):
        common.write_atomic(path, lambda f: f.write('newer'), 'w')
    assert open(path).read() == 'new' and os.listdir(tmp_path) == ['results.json'] and len(waits) == 6


def test_resume_of_an_each_run_takes_the_preset_its_members_were_trained_with(tmp_path):
    """An 'each' run keeps its checkpoints in <out_dir>/<category>/: --resume without --preset takes the
    preset from them, not the guess from --data (which filled not-reached categories with the other
    preset's values under this preset's name)."""
    common.save(str(tmp_path / 'weave' / 'ckpt.pt'), Tiny(dict(cfg_of('--preset', 'paper', '--device', 'cpu'),
                                                                category='weave')), step=5)
    cfg = cfg_of('--out_dir', str(tmp_path), '--category', 'each', '--resume', '--device', 'cpu')
    assert cfg['preset'] == 'paper' and cfg['steps'] == 1000       # synthetic data would have meant tiny (5)


def test_a_cuda_device_that_does_not_exist_is_a_clear_error(monkeypatch):
    for flags in (torch.backends.cuda.matmul, torch.backends.cudnn):       # pick_device sets them
        monkeypatch.setattr(flags, 'allow_tf32', flags.allow_tf32)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    assert common.pick_device('cuda:1') == 'cuda:1' and common.pick_device('cuda') == 'cuda'
    with pytest.raises(UserError, match=r'--device cuda:2: this machine has 2 CUDA device\(s\), cuda:0 to cuda:1'):
        common.pick_device('cuda:2')


def test_a_look_at_a_checkpoint_holds_no_mapped_tensor(tmp_path):
    """run() keeps a --resume checkpoint read with mmap=True while training saves over it; a mapped tensor
    would hold the file, which Windows cannot replace. The look keeps the config and plain entries."""
    path = str(tmp_path / 'ckpt.pt')
    common.save(path, Tiny(dict(width=2, k=1, preset='tiny')), step=5, stage=2, final=False, train_seconds=1.5,
                opt={'state': {0: {'exp_avg': torch.ones(2)}}})
    look = common.read_checkpoint(path, mmap=True)
    assert {k: look[k] for k in ('method', 'step', 'stage', 'final', 'train_seconds')} == dict(
        method='test_common', step=5, stage=2, final=False, train_seconds=1.5)
    assert look['config']['width'] == 2 and not {'model', 'opt', 'versions'} & set(look)
    assert torch.equal(common.read_checkpoint(path)['opt']['state'][0]['exp_avg'], torch.ones(2))   # full read


def test_load_refuses_bad_files(tmp_path):
    with pytest.raises(UserError, match='no checkpoint at'):
        common.load(str(tmp_path / 'none.pt'), Tiny)
    bad = tmp_path / 'pickled.pt'
    torch.save({'method': 'test_common', 'config': {}, 'model': {}, 'evil': Image.new('L', (1, 1))}, bad)
    with pytest.raises(UserError, match='holds Python objects.*refusing to unpickle'):
        common.load(str(bad), Tiny)
    common.save(str(tmp_path / 'ok.pt'), Tiny(dict(k=1)))
    (tmp_path / 'cut.pt').write_bytes((tmp_path / 'ok.pt').read_bytes()[:500])
    with pytest.raises(UserError, match='truncated or not a PyTorch file'):
        common.load(str(tmp_path / 'cut.pt'), Tiny)
    (tmp_path / 'text.pt').write_text('hello')
    with pytest.raises(UserError, match='truncated or not a PyTorch file'):
        common.load(str(tmp_path / 'text.pt'), Tiny)
    torch.save({'weights': torch.zeros(2)}, tmp_path / 'foreign.pt')
    with pytest.raises(UserError, match='not a checkpoint of this project'):
        common.load(str(tmp_path / 'foreign.pt'), Tiny)
    torch.save({'method': 'omiad', 'config': {}, 'model': {}}, tmp_path / 'other.pt')
    with pytest.raises(UserError, match='is a omiad checkpoint; use omiad.py'):
        common.load(str(tmp_path / 'other.pt'), Tiny)


def test_checkpoint_round_trip_in_a_fresh_process(tmp_path):
    path = str(tmp_path / 'ckpt.pt')
    m = Tiny(dict(k=1))
    common.save(path, m)
    code = (f'import sys, torch; sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, "tests")!r}]\n'
            'import common, test_common\n'
            f'm, _ = common.load({path!r}, test_common.Tiny)\n'
            'print(repr(m.lin(torch.ones(1, 3)).tolist()))')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == repr(m.lin(torch.ones(1, 3)).tolist())


def test_recalibrate_bn_restores_unit_scale_features():
    net = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Conv2d(8 if i else 3, 8, 3, padding=1, bias=False),
                                                    torch.nn.BatchNorm2d(8, momentum=0.01)) for i in range(6)]).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, std=0.01)                   # activations shrink per layer
    x = torch.rand(8, 3, 16, 16)
    assert net(x).std() < 1e-4
    common.recalibrate_bn(net, [x[:4], x[4:]])
    y = net(x)
    assert 0.5 < y.std() < 2 and not net.training and not any(m.training for m in net.modules())
    assert all(m.momentum == 0.01 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))   # its own


def test_load_pretrained_from_file_checks_keys_and_records_sha(tmp_path):
    src = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    f = tmp_path / 'w.pth'
    torch.save(src.state_dict(), f)
    dst = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    rec = common.load_pretrained(dst, 'toy', str(f))
    assert torch.equal(dst[0].weight, src[0].weight)
    assert rec == dict(id='toy', file='w.pth', sha256=hashlib.sha256(f.read_bytes()).hexdigest())
    with pytest.raises(UserError, match='does not fit toy'):
        common.load_pretrained(torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3)), 'toy', str(f))
    with pytest.raises(UserError, match='not found'):
        common.load_pretrained(dst, 'toy', str(tmp_path / 'missing.pth'))
    torch.save(src, tmp_path / 'module.pth')                                  # the module, not its state dict
    (tmp_path / 'cut.pth').write_bytes(f.read_bytes()[:100])
    torch.save(torch.zeros(3), tmp_path / 'tensor.pth')
    for name, message in (('module', 'cannot read weights'), ('cut', 'cannot read weights'), ('tensor', 'no state dict')):
        with pytest.raises(UserError, match=message):
            common.load_pretrained(dst, 'toy', str(tmp_path / f'{name}.pth'))
    with pytest.raises(UserError, match='not in the timm cache.*--backbone_weights FILE'):
        common.load_pretrained(dst, 'no_such_model_xyz.in1k', 'timm')    # looks locally, never downloads


def test_load_pretrained_finds_timm_default_weights_in_the_cache(tmp_path, monkeypatch):
    """'timm' looks in the local Hugging Face cache (here a temporary folder; nothing is fetched) under
    the name timm stores a model's default weights: a bare architecture (resnet18) means its default
    tag (resnet18.a1_in1k)."""
    from huggingface_hub import constants
    from safetensors.torch import save_file
    src = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    snapshot = tmp_path / 'models--timm--resnet18.a1_in1k' / 'snapshots' / 'abc123'
    snapshot.mkdir(parents=True)
    (tmp_path / 'models--timm--resnet18.a1_in1k' / 'refs').mkdir()
    (tmp_path / 'models--timm--resnet18.a1_in1k' / 'refs' / 'main').write_text('abc123')
    save_file(src.state_dict(), str(snapshot / 'model.safetensors'))
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path))
    dst = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    rec = common.load_pretrained(dst, 'resnet18', 'timm')
    assert torch.equal(dst[0].weight, src[0].weight) and rec['id'] == 'resnet18.a1_in1k'

# -----------------------------------------------------------------------------
# the protocol's data and mechanics, each pinned against a hand computation


def test_masks_are_resized_nearest_and_cut_at_one_half():
    """8 -> 4 px nearest keeps source pixels 1, 3, 5, 7;
    127 is below one half of 255, 128 above."""
    a = (np.random.default_rng(0).random((8, 8)) < 0.5).astype(np.uint8) * 255
    assert a[1::2, 1::2].any() and not a[1::2, 1::2].all()
    np.testing.assert_array_equal(common._read(a, 4, mask=True)[0], (a[1::2, 1::2] > 0).astype(np.uint8))
    b = np.array([[0, 127], [128, 255]], np.uint8)
    np.testing.assert_array_equal(common._read(b, 2, mask=True)[0], [[0, 0], [1, 1]])


def test_images_are_resized_bilinearly():
    """A 2x2 image with columns 0 and 100 upsampled to 4 px is 0, 25, 75, 100 per row
    (half-pixel centres, edges clamped); nearest would repeat 0 0 100 100."""
    a = np.zeros((2, 2, 3), np.uint8)
    a[:, 1] = 100
    x = common._read(a, 4)
    assert x.shape == (3, 4, 4)
    np.testing.assert_array_equal(x, np.broadcast_to([0, 25, 75, 100], (3, 4, 4)))


def test_16_bit_images_are_scaled_by_257(tmp_path):
    """16-bit 257 * v reads as exactly v (65535 -> 255); by 256, 51400 would read 201."""
    Image.fromarray(np.full((4, 4), 257 * 200, np.uint16)).save(tmp_path / 'deep.png')
    assert (common._read(str(tmp_path / 'deep.png'), 4) == 200).all()


def _folder(root, n_train=10):
    for i in range(n_train):
        _img(f'{root}/part/train/good/{i:03d}.png', size=(8, 8), value=i)
    _img(f'{root}/part/test/good/000.png', size=(8, 8))
    return root


def test_the_validation_split_is_a_seeded_share_of_train_good(tmp_path):
    """10 training images, val_frac 0.35:
    round(3.5) = 4 images, those at the first 4 positions of the permutation seeded by
    (seed, 'val', category); train is the other 6; another seed, another split."""
    root = _folder(tmp_path / 'd')
    cfg = dict(data='folder', data_root=str(root), category='part', image_size=8, eval_size=8, val_frac=0.35)
    files = [os.path.join('part', 'train', 'good', f'{i:03d}.png') for i in range(10)]
    vals = []
    for seed in (0, 1):
        val, train = (common.load_dataset(dict(cfg, seed=seed), s) for s in ('val', 'train'))
        order = np.random.default_rng(common.key_seed(seed, 'val', 'part')).permutation(10)
        assert val.paths == [files[i] for i in sorted(order[:4])]
        assert train.paths == [files[i] for i in sorted(order[4:])]
        vals.append(val.paths)
    assert vals[0] != vals[1]


def test_masks_are_matched_to_their_image_stem_only(tmp_path):
    """000.png must not also take 0001_mask.png."""
    root = tmp_path / 'd'
    os.makedirs(root / 'part' / 'ground_truth' / 'crack')
    for stem, rows in (('000', slice(0, 2)), ('0001', slice(4, 6))):
        _img(f'{root}/part/test/crack/{stem}.png', size=(8, 8))
        m = np.zeros((8, 8), np.uint8)
        m[rows] = 255
        Image.fromarray(m).save(f'{root}/part/ground_truth/crack/{stem}_mask.png')
    _img(f'{root}/part/train/good/000.png', size=(8, 8))
    test = common.load_dataset(dict(data='folder', data_root=str(root), category='part', image_size=8,
                                    eval_size=8, seed=0, val_frac=0.0), 'test')
    assert test.paths == [os.path.join('part', 'test', 'crack', f) for f in ('000.png', '0001.png')]
    assert test.masks[0, 0, 0:2].all() and test.masks[0].sum() == 16
    assert test.masks[1, 0, 4:6].all() and test.masks[1].sum() == 16


def test_batch_order_is_the_seeded_per_epoch_permutations_concatenated():
    """n = 10, batch 4: steps 0-4 cover positions 0-19 of perm(seed, epoch 0) + perm(seed, epoch 1),
    each drawn from key_seed(seed, 'epoch', e); a resume at step 3 starts at position 12."""
    for seed in (0, 5):
        perms = [np.random.default_rng(common.key_seed(seed, 'epoch', e)).permutation(10) for e in range(2)]
        stream = np.concatenate(perms)
        it = common._batch_keys(10, 4, seed, 0, 0, 1)
        for step in range(5):
            assert next(it) == [(step, j, int(stream[4 * step + j])) for j in range(4)]
        assert next(common._batch_keys(10, 4, seed, 3, 0, 1)) == [(3, j, int(stream[12 + j])) for j in range(4)]
    assert not np.array_equal(*[np.random.default_rng(common.key_seed(s, 'epoch', 0)).permutation(10) for s in (0, 5)])


def test_augmentation_rng_is_keyed_by_seed_step_and_position():
    """Sample j of step s is augmented with default_rng(key_seed(seed, 'aug', s, j)): not one
    augmentation per batch, nor the same ones every step."""
    data = [dict(x=torch.tensor(i)) for i in range(10)]
    cfg = dict(batch_size=4, seed=3, num_workers=0, device='cpu')
    it = common.train_batches(data, cfg, 0, lambda s, rng: dict(s, u=torch.tensor(rng.random(), dtype=torch.float64)))
    for step in range(3):
        u = next(it)['u'].tolist()
        assert u == [np.random.default_rng(common.key_seed(3, 'aug', step, j)).random() for j in range(4)]
        assert len(set(u)) == 4


def test_a_checkpoint_with_weights_the_model_does_not_have_is_refused(tmp_path):
    """Weights of another network are an error, not silently dropped."""
    path = str(tmp_path / 'ckpt.pt')
    common.save(path, Tiny(dict(k=1)))
    ckpt = torch.load(path, weights_only=True)
    ckpt['model']['head.weight'] = torch.zeros(2, 3)
    torch.save(ckpt, path)
    with pytest.raises(UserError, match=r"does not match .*unexpected \['head.weight'\]"):
        common.load(path, Tiny)


def test_load_optimizer_keeps_the_moments_and_takes_the_new_hyperparameters():
    """A resume with --lr typed: the saved Adam moments and step count, the lr and betas of the
    optimiser built from the new config (load_state_dict alone brings the old ones back)."""
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    old = torch.optim.Adam([w], lr=1e-3)
    (w ** 2).sum().backward()
    old.step()
    state = copy.deepcopy(old.state_dict())
    plain = torch.optim.Adam([w], lr=5e-4, betas=(0.5, 0.9))
    plain.load_state_dict(state)
    assert plain.param_groups[0]['lr'] == 1e-3                   # why load_optimizer exists
    new = torch.optim.Adam([w], lr=5e-4, betas=(0.5, 0.9))
    common.load_optimizer(new, state)
    assert new.param_groups[0]['lr'] == 5e-4 and new.param_groups[0]['betas'] == (0.5, 0.9)
    assert new.param_groups[0]['params'] == [w]
    for k in ('exp_avg', 'exp_avg_sq', 'step'):
        assert torch.equal(new.state[w][k], old.state[w][k]), k
