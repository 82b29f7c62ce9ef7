"""
common.py: what the five method scripts share, and nothing method-specific.

  config      get_config: defaults < preset < command line, --help, errors that name the fix
  system      device, seeding, seeded generators, autocast, torch.distributed helpers, run()
  checkpoint  save (atomic), load and resume (weights_only=True, clear errors)
  data        MVTec AD, MVTec-like folders, BTAD, VisA (raw and 1cls), the built-in synthetic
              benchmark; deterministic training batches; Perlin anomaly synthesis
  metrics     image/pixel AUROC, AP, F1-max, the official MVTec AUPRO, mAD
  backbones   pretrained weights from a local file or the timm cache, BatchNorm recalibration
"""
import csv
import datetime
import difflib
import functools
import glob
import hashlib
import importlib
import json
import math
import os
import platform
import random
import re
import signal
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps
from scipy import ndimage


class UserError(Exception):
    """A mistake the user can fix (path, key, category, checkpoint): printed as one line, exit 2."""


def cli(main):
    """Run main() and turn UserError into a one-line message and a non-zero exit."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # a kill (timeout, a scheduler) unwinds like
    try:                                                        # Ctrl-C: write_atomic removes its temporary file
        main()
    except UserError as e:   # one raised in a DataLoader worker carries its traceback: keep the last line
        print(f"error: {str(e).strip().splitlines()[-1].split('UserError: ', 1)[-1]}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print('interrupted (a training run keeps its last checkpoint, if it wrote one: --resume continues from it)',
              file=sys.stderr)
        sys.exit(130)

# -----------------------------------------------------------------------------
# config: every script has one dict of defaults (BASE_CONFIG + its own keys) and two presets

BASE_CONFIG = dict(
    data='synthetic',       # synthetic | mvtec | visa | btad | folder (any MVTec-like root, e.g. MPDD)
    data_root='',           # dataset folder; '' = data/<data>
    category='all',         # a category, 'all' (one multi-class model) or 'each' (one model per category)
    preset='auto',          # auto | paper | tiny; auto = tiny on synthetic data, paper otherwise
    out_dir='',             # '' = out/<method>_<data>_<category>_<preset>_s<seed>
    seed=0,                 # seeds init, data order, training noise, test noise and the validation split
    device='auto',          # auto (cuda > mps > cpu) | cpu | cuda | cuda:1 | mps
    dtype='float32',        # float32 | bfloat16 (autocast; TF32 is always allowed on CUDA)
    compile=False,          # torch.compile the networks for training (meant for GPUs; the first steps are slow)
    batch_size=16,          # global training batch size, split over DDP ranks
    image_size=256,         # network input size in pixels (images are resized, not cropped)
    eval_size=0,            # size of maps and masks for the metrics; 0 = 128 on synthetic, 256 otherwise
    val_frac=0.1,           # share of train/good held out as the validation split (never the test set)
    train=False,            # train, then evaluate (also what happens when neither --train nor --eval is given)
    eval=False,             # only evaluate the checkpoint in out_dir
    resume=False,           # continue out_dir/ckpt.pt exactly (same hardware), with its config + keys given
    dtd_root='',            # DTD folder (images/*/*.jpg) for Perlin anomaly textures; '' = procedural
    backbone_weights='',    # '' = random init + BatchNorm recalibration, 'timm' = timm cache (paper), or a file
    num_workers=0,          # data loader worker processes for training
    log_interval=100,       # steps between log lines
    ckpt_interval=1000,     # steps between checkpoints
    heatmaps=0,             # heatmap PNGs written per category at evaluation
)
METHODS = ('diffusionad', 'inversion_ad', 'omiad', 'decodiff', 'lasb')
RUNTIME_KEYS = ('device', 'data_root', 'batch_size', 'heatmaps', 'num_workers', 'out_dir', 'dtype')
MEASURED_KEYS = ('data_root', 'batch_size', 'dtype')   # run-time keys that still change the numbers
# what a resumed run takes from this command line even when not typed (see resume())
RESUME_KEYS = ('device', 'out_dir', 'train', 'eval', 'resume')


def _given(cfg):
    """The keys this command line decides: those typed (cli_keys) and RESUME_KEYS; the others
    come from a checkpoint when there is one."""
    return set(cfg.get('cli_keys', ())) | set(RESUME_KEYS)


def _comments(path):
    """key -> the comment after `key=value,  # comment` (or `'key': value,  # ...`) in a file."""
    out = {}
    for line in open(path, encoding='utf-8'):
        m = re.match(r"\s*'?(\w+)'?\s*[=:]\s*.+?,?\s+#\s*(.+)$", line)
        if m:
            out.setdefault(m[1], m[2])
    return out


def _coerce(key, text, default):
    """Parse a command-line string to the type of the default, or fail naming the key."""
    kind = type(default)
    try:
        if kind is bool:
            return {'1': True, 'true': True, 'yes': True, '0': False, 'false': False, 'no': False}[str(text).lower()]
        if kind is str:   # 'data/mvtec/' (or data\mvtec on Windows) is data/mvtec: one run, one --compare row
            return os.path.normpath(text).replace(os.sep, '/') if key.endswith('_root') and text else str(text)
        if kind is tuple:   # '1,2,4' or '(1, 2, 4)'
            return tuple(type(default[0])(v) for v in str(text).strip('()[] ').split(',') if v.strip())
        if kind is int and not str(text).lstrip('+-').isdigit():   # '1e2' -> 100; digits stay exact
            return int(float(text)) if float(text).is_integer() else int(text)
        return kind(text)
    except (ValueError, TypeError, IndexError, KeyError):
        raise UserError(f"--{key} expects {kind.__name__} (default {default!r}), got {text!r}")


def _parse_argv(argv, defaults):
    """['--lr', '1e-4', '--no-ema', '--data=mvtec'] -> {'lr': 1e-4, 'ema': False, 'data': 'mvtec'}."""
    out, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith('--'):
            raise UserError(f"unexpected argument {arg!r}; options look like --key value (see --help)")
        key, has_value, value = arg[2:].partition('=')
        key = key.replace('-', '_')
        if key not in defaults and key.startswith('no_') and isinstance(defaults.get(key[3:]), bool):
            key, has_value, value = key[3:], True, 'false'
        if key not in defaults and key in BASE_CONFIG:
            raise UserError(f'--{key} is a shared option that this method does not use; see --help')
        if key not in defaults:
            close = difflib.get_close_matches(key, defaults, n=1)
            hint = f' (did you mean --{close[0]}?)' if close else ''
            raise UserError(f'unknown option --{key}{hint}; see --help')
        if not has_value and isinstance(defaults[key], bool):
            value = 'true'
        elif not has_value:
            if i + 1 >= len(argv) or argv[i + 1].startswith('--'):
                raise UserError(f'--{key} needs a value (default {defaults[key]!r})')
            value, i = argv[i + 1], i + 1
        out[key] = _coerce(key, value, defaults[key])
        i += 1
    return out


def print_help(defaults, presets, files, doc=''):
    comments = {}
    for f in files:
        comments = {**_comments(f), **comments}
    print((doc or '').strip().split('\n\n')[0] + '\n\noptions (default, [preset values]):')
    for key, value in defaults.items():
        tags = ', '.join(f'{p}: {v[key]!r}' for p, v in presets.items() if key in v)
        print(f"  --{key} {value!r}".ljust(34) + comments.get(key, '') + (f'  [{tags}]' if tags else ''))


def data_defaults(cfg):
    """Fill data_root ('' = data/<data>) and eval_size (0 = 128 on synthetic, 256 otherwise)."""
    return dict(cfg, data_root=cfg['data_root'] or f"data/{cfg['data']}",      # as _coerce writes it
                eval_size=cfg['eval_size'] or (128 if cfg['data'] == 'synthetic' else 256))


def _check_values(cfg):
    """One-line errors for values of shared keys no method could use (a config, or a checkpoint's with
    eval.py's overrides), before anything is loaded, trained or evaluated."""
    if cfg.get('dtype', 'float32') not in ('float32', 'bfloat16'):
        raise UserError(f"--dtype must be float32 or bfloat16 (got {cfg['dtype']!r})")
    mps = 'mps' in str(cfg.get('device'))
    if cfg.get('dtype') == 'bfloat16' and mps and not torch.backends.mps.is_macos_or_newer(14, 0):
        raise UserError('--dtype bfloat16 on a Mac GPU needs macOS 14 (before, MPS autocast falls back to float32)')
    for key, low in (('batch_size', 1), ('image_size', 1), ('heatmaps', 0), ('eval_size', 0), ('num_workers', 0),
                     ('log_interval', 1), ('ckpt_interval', 1), ('T', 1), ('ch', 1), ('num_res_blocks', 0)):
        if cfg.get(key, low) < low:          # (T, ch, num_res_blocks: every method's schedule and U-Net)
            raise UserError(f'--{key} must be at least {low} (got {cfg[key]})')
    mult = cfg.get('ch_mult', (1,))
    if not mult or min(mult) < 1:
        raise UserError(f"--ch_mult needs one positive multiplier per U-Net level, e.g. 1,2,4 (got {cfg['ch_mult']})")
    beta = cfg.get('anomaly_beta', ())              # common.perlin_anomaly's keys (DiffusionAD, LASB)
    if not 0 <= cfg.get('anomaly_p', 0) <= 1 or any(not 0 <= b <= 1 for b in beta) or list(beta) != sorted(beta):
        raise UserError(f"need 0 <= --anomaly_p <= 1 and an opacity range 0 <= low <= high <= 1 for --anomaly_beta "
                        f"(got {cfg['anomaly_p']} and {beta})")
    if abs(cfg.get('seed', 0)) >= 2 ** 63:                     # torch.manual_seed would overflow
        raise UserError(f"--seed must lie between -2^63 and 2^63 (got {cfg['seed']})")
    for key, v in cfg.items():                   # e.g. --lr nan, which Adam would refuse in a traceback
        if any(isinstance(x, float) and not math.isfinite(x) for x in (v if isinstance(v, tuple) else (v,))):
            raise UserError(f'--{key} must be a finite number (got {v})')


def _check_shared(cfg):
    """_check_values, and the keys only a command line sets: --train with --eval, a DTD folder."""
    _check_values(cfg)
    if cfg['train'] and cfg['eval']:
        raise UserError('--train trains and then evaluates, --eval only evaluates a saved run: give one of them')
    if cfg['data'] not in ('synthetic', *WHERE):     # now, not as a KeyError of --category each
        _check_root(cfg['data'], cfg['data_root'])    # which names the choices
    if not 0 <= cfg['val_frac'] < 1:
        raise UserError(f"--val_frac is the share of train/good held out: 0 <= val_frac < 1 (got {cfg['val_frac']})")
    if cfg.get('dtd_root'):
        _dtd_files(cfg['dtd_root'])      # a wrong folder fails now, not after a first training stage


def get_config(defaults, presets, argv=None, file=None, doc=''):
    """defaults < presets[preset] < command line. Prints the preset and every override."""
    argv = sys.argv[1:] if argv is None else list(argv)
    method = os.path.splitext(os.path.basename(file or sys.argv[0]))[0]
    if '-h' in argv or '--help' in argv:
        print_help(defaults, presets, [file or sys.argv[0], __file__], doc)
        sys.exit(0)
    cli_args = _parse_argv(argv, defaults)
    if cli_args.get('device') == 'auto':     # typing the default asks for no device: a CPU is still implicit
        del cli_args['device']
    data = cli_args.get('data', defaults['data'])
    preset = cli_args.get('preset', defaults['preset'])
    root = cli_args.get('out_dir')          # --eval/--resume: the run's checkpoint, or an 'each' run's first member's
    saved = _first_checkpoint(root, cli_args.get('category') == 'each') if root else None
    known = preset == 'auto' and (cli_args.get('eval') or cli_args.get('resume')) and bool(saved)
    if known:         # the run's preset (not the guess from --data, which its keys may contradict: that is said)
        preset = read_checkpoint(saved, mmap=True).get('preset', preset)     # (older files: the guess)
    if preset == 'auto':
        preset = 'tiny' if data == 'synthetic' else 'paper'
    if preset not in presets:
        raise UserError(f"unknown preset {preset!r}; choose auto, {', '.join(presets)}")
    cfg = data_defaults({**defaults, **presets[preset], **cli_args, 'preset': preset, 'method': method,
                         'cli_keys': tuple(cli_args)})      # what the user chose; --resume keeps these
    cfg['out_dir'] = cfg['out_dir'] or os.path.join(
        'out', f"{method}_{cfg['data']}_{cfg['category']}_{preset}_s{cfg['seed']}")
    cfg['device'] = pick_device(cfg['device'])
    _check_shared(cfg)
    if preset == 'paper' and cfg['device'] == 'cpu' and 'device' not in cli_args and not known:   # (_check_start)
        if cfg['data'] != 'synthetic' and not (cfg['eval'] or cfg['resume']):
            _check_root(cfg['data'], cfg['data_root'])     # needed on any device: say it first
        raise UserError('the paper preset takes days on a CPU and no GPU was found; use --preset tiny, '
                        'or pass --device cpu to run it anyway')
    if int(os.environ.get('RANK', 0)) == 0:          # torchrun: once, not once per process
        auto = cli_args.get('preset', defaults['preset']) == 'auto'
        if not (auto and (cfg['resume'] or cfg['eval'])):     # else the checkpoint's (resume and results print it)
            print(f'{method}: preset {preset}' + (' (auto)' if auto else ''))
        for key, value in cli_args.items():
            print(f'overriding: {key} = {value!r}')
        if 'data_root' in cli_args and cfg['data'] == 'synthetic':     # a likely slip: a folder without --data
            print('note: --data synthetic is generated, not read from --data_root: for your images add --data folder')
    return cfg

# -----------------------------------------------------------------------------
# system: device, seeds, generators, autocast, distributed


def pick_device(name='auto'):
    """The device to run on. On CUDA it also allows TF32 for float32 matmuls and convolutions (faster,
    float32 range): here, where every entry point (training, eval.py, --predict, --bench) picks its
    device, so that re-evaluating a checkpoint runs at the precision its training run evaluated at."""
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    try:
        kind, index = torch.device(name).type, torch.device(name).index
    except RuntimeError:
        raise UserError(f'--device {name!r}: use auto, cpu, cuda, cuda:N or mps')
    if not dict(cuda=torch.cuda.is_available(), mps=torch.backends.mps.is_available()).get(kind, True):
        raise UserError(f'--device {name}: no {kind} device here; use --device cpu')
    if kind == 'cuda' and index is not None and index >= (n := torch.cuda.device_count()):
        raise UserError(f'--device {name}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}')
    if kind == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return name


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def key_seed(*keys):
    """A 63-bit seed that is a pure function of the keys (stable across runs, machines, Python)."""
    return int.from_bytes(hashlib.sha256(repr(keys).encode()).digest()[:8], 'little') >> 1


def generator(*keys, device='cpu'):
    """torch.Generator seeded by keys, e.g. generator(seed, rank, step) for one training step. For a
    CUDA device it lives on that GPU, so training noise is drawn where it is used: one draw of
    OmiAD's paper-size batch noise (32 x 272 x 32 x 32) takes ~80 ms on 2 CPU cores, up to three
    times per distillation step, while the GPU waits (so a CUDA run trains on other noise than a CPU
    run). For any other device (CPU, MPS) it is a CPU generator. Draw with device=g.device, then
    .to(device)."""
    device = torch.device(device)
    return torch.Generator(device if device.type == 'cuda' else 'cpu').manual_seed(key_seed(*keys))


def sample_noise(shape, seed, paths, device='cpu'):
    """Test-time noise, one draw per sample seeded by (seed, path): scores do not depend on batch
    size, batch position or DDP sharding. Drawn on the CPU, so that a checkpoint scores an image
    alike on every device (as diffusers advises for its pipelines). The price: ~9 ns per value, so
    2.5 ms per image for OmiAD's paper-size features, 6x the 0.4 ms of its paper's whole pass on a GPU."""
    return torch.stack([torch.randn(shape, generator=generator(seed, p)) for p in paths]).to(device)


def autocast(device, dtype='float32'):
    """bfloat16 autocast when asked for, on the CPU too (so that what results.json records is what
    ran); float32 otherwise."""
    if dtype == 'float32':
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def print0(*args):
    """print on rank 0 only, through tqdm so that an active progress bar is not garbled."""
    if rank_world()[0] == 0:
        from tqdm import tqdm
        tqdm.write(' '.join(str(a) for a in args))


def dist_setup(cfg):
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU); sets cfg['device'] per rank."""
    if int(os.environ.get('WORLD_SIZE', 1)) > 1 and not dist.is_initialized():
        local = int(os.environ.get('LOCAL_RANK', 0))
        if 'mps' in cfg['device']:       # one Apple GPU per machine, and gloo cannot reduce MPS tensors
            raise UserError('torchrun on a Mac GPU (mps): run one process (python <method>.py), or add --device cpu')
        if 'cuda' in cfg['device']:
            cfg['device'] = f'cuda:{local}'
            torch.cuda.set_device(cfg['device'])
        # ranks > 0 wait in a barrier while rank 0 evaluates, which can outlast the 10-30 min default
        nccl = 'cuda' in cfg['device'] and dist.is_nccl_available()     # Windows builds have no NCCL: gloo
        dist.init_process_group('nccl' if nccl else 'gloo', timeout=datetime.timedelta(hours=6))
    return rank_world()


def dist_teardown():
    """No barrier: run() already meets one after every category, and after an error on one rank a
    barrier would wait for ranks that are stuck elsewhere."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_grads(params):
    """Average gradients over ranks. Works for any update pattern (several networks, alternating
    steps, sub-networks called outside forward) where a DDP wrapper would not; a missing gradient
    counts as zero so every rank makes the same collective calls."""
    world = rank_world()[1]
    if world == 1:
        return
    buckets, size = [], 0               # one collective per ~64 MB of gradients, not one per tensor
    for p in params:
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if not buckets or size + p.numel() > 2 ** 24:
                buckets.append([])
                size = 0
            buckets[-1].append(p.grad)
            size += p.numel()
    for grads in buckets:
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        for g, mean in zip(grads, (flat / world).split([g.numel() for g in grads])):
            g.copy_(mean.view_as(g))


def check_finite(loss, step, ckpt_path):
    """Stop on a NaN/inf loss before it reaches the weights; the last checkpoint stays as it was.
    Decided over all ranks (one collective per step), so every rank stops, not just the one that
    saw it while the others wait for its gradients."""
    bad = (~torch.isfinite(loss.detach())).any().float()
    if rank_world()[1] > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        kept = (f'the last good checkpoint is {ckpt_path} (lower the learning rate, then --resume)' if
                os.path.exists(ckpt_path) else 'no checkpoint was saved yet (check the learning rate and the config)')
        raise UserError(f'loss is not finite at step {step} (here {loss.item()}): training stopped; {kept}')


def run(cfg, train, Model):
    """main() of every method. category 'each' loops over categories, one out_dir each; --eval
    loads out_dir/ckpt.pt instead of training; rank 0 evaluates; an 'each' run ends with a mean row.
    train(cfg) must return (model, train_seconds)."""
    from eval import evaluate, summarize_each   # eval imports common, so import it on use
    rank, world = dist_setup(cfg)
    try:
        each = cfg['category'] == 'each'
        cats = categories(cfg['data'], cfg['data_root']) if each else [cfg['category']]
        _check_start(cfg, [os.path.join(cfg['out_dir'], *([cat] if each else []), 'ckpt.pt') for cat in cats])
        results = []
        for cat in cats:
            c = dict(cfg, category=cat, out_dir=os.path.join(cfg['out_dir'], cat)) if each else cfg
            trained_with, path, done = None, os.path.join(c['out_dir'], 'ckpt.pt'), None
            if each and c['resume'] and not c['eval']:
                c, done = _resume_each(c, cfg['out_dir'], cats)
            saved = read_checkpoint(path, mmap=True) if done is None and c['resume'] and os.path.isfile(path) else None
            if saved and not c['eval'] and _finished(c, saved, getattr(Model, 'INFER_KEYS', ())):
                print0(f'{path} has finished training: evaluating it, as --eval does')
                c = dict(c, eval=True, train=False)
            if done is None and c['eval']:
                model, ckpt = _load_finished(c, path, Model)
                seconds, trained_with = ckpt.get('train_seconds', float('nan')), ckpt.get('versions')
            elif done is None:
                model, seconds = _train(c, path, saved, train, Model)
            if rank == 0 and done is None:                           # data_root etc. as trained unless typed
                test = load_dataset(dict(model.cfg, **{k: c[k] for k in RUNTIME_KEYS if k in _given(c)}), 'test')
                done = evaluate(model, test, c['out_dir'], c['heatmaps'], seconds, train_versions=trained_with)
            if each and rank == 0:   # rewritten after every category: a killed run shows what is missing
                results.append(done)
                summarize_each(cfg['out_dir'], results, quiet=cat != cats[-1])
            barrier()
    finally:
        dist_teardown()


def _train(c, path, saved, train, Model):
    """train(c) -> (model, train_seconds): the checkpoint's seconds, which re-evaluations report;
    a resume that trained nothing (its checkpoint had finished) returns the checkpoint as saved."""
    model, seconds = train(dict(c, categories=list(_categories_of(c))))   # kept in the checkpoint
    after = read_checkpoint(path, mmap=True) if rank_world()[0] == 0 and os.path.isfile(path) else {}
    if saved and (after.get('stage'), after.get('step')) == (saved.get('stage'), saved.get('step')):
        print0(f'note: nothing was trained: {path} had finished and no key typed lengthens it (--lr, '
               'say); it is evaluated as saved')
        model = load(path, Model, device=c['device'])[0]
    return model, after.get('train_seconds', seconds)


def _first_checkpoint(out_dir, members=True):
    """out_dir/ckpt.pt, else (members: an 'each' run keeps one per category) its first category's; or None."""
    found = [os.path.join(out_dir, 'ckpt.pt')] + (
        sorted(glob.glob(os.path.join(glob.escape(out_dir), '*', 'ckpt.pt'))) if members else [])
    return next((p for p in found if os.path.isfile(p)), None)


def _check_start(cfg, paths):
    """Fail now, not after training. A run from the start: its data must be readable, and no checkpoint
    of it may exist yet (never restart over a run silently). --resume/--eval of a --category each run
    must name it as trained: its categories come from --data and --data_root (a member says which), and
    a paper-preset run, whose preset only its checkpoint may know, is refused on a CPU nobody asked for
    (as get_config refuses a typed one)."""
    if not cfg['resume'] and not cfg['eval']:
        check_data(cfg)
        for path in paths:
            if os.path.isfile(path):
                raise UserError(f'{path} exists: --resume continues it, --eval evaluates it; to train '
                                'from the start, delete it or choose another --out_dir')
        return
    own, first = os.path.join(cfg['out_dir'], 'ckpt.pt'), _first_checkpoint(cfg['out_dir'])
    if first is None:
        return                                    # read_checkpoint says so where it is needed
    saved = read_checkpoint(first, mmap=True)['config']
    if saved.get('preset') == 'paper' and cfg['device'] == 'cpu' and 'device' not in cfg.get('cli_keys', ()):
        raise UserError(f"{cfg['out_dir']} holds a paper-preset run and no GPU was found: pass --device cpu "
                        f"to {'resume' if cfg['resume'] else 'evaluate'} it on the CPU anyway")
    if first != own:                              # a --category each run
        need = dict(category='each', data=saved['data'], data_root=saved['data_root'])
        if any(os.path.abspath(str(cfg[k])) != os.path.abspath(str(v)) for k, v in need.items()):
            raise UserError(f"{cfg['out_dir']} holds a --category each run: add "
                            + ' '.join(f'--{k} {v}' for k, v in need.items()))


def _load_finished(c, path, Model):
    """(model, ckpt) of a finished run for --eval, or a one-line error: a mid-run checkpoint, or a key
    typed now that differs from the one trained with (it would be ignored, or evaluated into the run's
    results; inference keys and data go through eval.py instead)."""
    ckpt = read_checkpoint(path)        # the run's results come from its finished model only
    if ckpt.get('final') is False:      # (refused here, before load() would warn about it)
        final = getattr(Model, 'FINAL_STAGE', None)         # eval.py scores none of an earlier stage
        as_is = f' or evaluate it as it is with python eval.py {path}' if ckpt.get('stage', final) == final else ''
        raise UserError(f"{path} was saved at step {ckpt['step']}, before training ended: finish it "
                        f'with --resume{"," if as_is else ""}{as_is}')
    model, ckpt = load(path, Model, device=c['device'], ckpt=ckpt)
    changed = {k: c[k] for k in c.get('cli_keys', ()) if (k not in RUNTIME_KEYS + RESUME_KEYS or k in MEASURED_KEYS)
               and c[k] != ckpt['config'].get(k)}
    if changed:
        trained = ', '.join(f"{k} {ckpt['config'].get(k)!r}" for k in changed)
        infer = getattr(Model, 'INFER_KEYS', ())              # a method may have none
        hint = f"only inference keys may differ, through python eval.py {path} ({', '.join(infer) or 'none'})"
        if set(changed) <= set(infer) | set(MEASURED_KEYS):
            hint = f'for other data or inference keys run: python eval.py {path}' + ''.join(
                f' --{k} {v}' for k, v in changed.items())
        raise UserError(f'{path} is evaluated as trained ({trained}); {hint}')
    return model, ckpt


def _finished(c, saved, infer=()):
    """The checkpoint saved (read with mmap) holds a finished model (not a mid-run checkpoint evaluated
    by hand) and nothing typed now (--steps, say) would train it further: --resume then evaluates it,
    without re-saving it or adding to its training time (and refuses typed infer keys, as --eval does)."""
    new = [k for k in _given(c) - set(RESUME_KEYS + RUNTIME_KEYS + tuple(infer)) if c[k] != saved['config'].get(k)]
    return saved.get('final') is not False and not new


def _resume_each(c, root, cats):
    """--resume of an 'each' run, for one category: (c, results) if it had finished and nothing new is
    typed (kept as evaluated), else (c, None) to train: from its checkpoint, or, not reached before a
    kill, from the start with the options the run was started with (a sibling checkpoint's cli_keys)
    and the ones typed now."""
    done, path = os.path.join(c['out_dir'], 'results.json'), os.path.join(c['out_dir'], 'ckpt.pt')
    # an inference key typed: not kept as it was, so that run() refuses it as --eval does
    if os.path.isfile(done) and os.path.isfile(path) and _finished(c, read_checkpoint(path, mmap=True)):
        print0(f"{c['category']}: finished; kept as it was")
        return c, read_results(done)
    siblings = [p for p in (os.path.join(root, k, 'ckpt.pt') for k in cats) if os.path.isfile(p)]
    if path in siblings or not siblings:      # killed in it (or finished, with keys typed now), or none yet
        return c, None
    saved = read_checkpoint(siblings[0], mmap=True)['config']
    first = {k: saved[k] for k in saved.get('cli_keys', ()) if k not in RESUME_KEYS + ('category',)}
    typed = {k: c[k] for k in c.get('cli_keys', ()) if k != 'category'}
    print0(f"{c['category']}: not reached before the run stopped; training it from the start")
    return {**c, **first, **typed, 'resume': False, 'cli_keys': tuple({**first, **typed})}, None

# -----------------------------------------------------------------------------
# checkpoints: one dict, written atomically, read with weights_only=True


def method_of(Model):
    return os.path.splitext(os.path.basename(sys.modules[Model.__module__].__file__))[0]


def import_method(name):
    """The module of a method file by name: one of METHODS, or a copy or a new method file beside
    common.py or on PYTHONPATH (how eval.py finds the method a checkpoint names)."""
    try:
        module = importlib.import_module(name.removesuffix('.py'))     # 'lasb.py' means lasb
    except ImportError as e:
        close = difflib.get_close_matches(name.removesuffix('.py'), METHODS, n=1)
        raise UserError(f"cannot import the method {name!r} ({e}): its file must sit beside common.py or on "
                        f"PYTHONPATH; this project's methods: {', '.join(METHODS)}"
                        + (f' (did you mean {close[0]}?)' if close else ''))
    if not hasattr(module, 'Model'):
        raise UserError(f'{name!r} is not a method file: it defines no Model')
    return module


def saved_config(ckpt, Model):
    """The checkpoint's config over the method's current defaults and preset, so that a key added to
    the method file after the checkpoint was saved takes its default instead of a KeyError; or, if
    the method file's LEGACY names it, the value that reproduces the code the checkpoint came from."""
    module, preset = sys.modules[Model.__module__], ckpt['config'].get('preset')
    base = {**module.config, **getattr(module, 'PRESETS', {}).get(preset, {})} if hasattr(module, 'config') else {}
    return {**base, **getattr(module, 'LEGACY', {}), **ckpt['config']}


def save(path, model, **state):
    """Write {method, config, preset, model, **state} to path atomically (rank 0 only): a kill
    mid-write leaves the previous checkpoint intact."""
    if rank_world()[0] != 0:
        return
    ckpt = dict(method=method_of(type(model)), config=model.cfg, preset=model.cfg.get('preset'),
                model=model.state_dict(), versions=versions(), **state)
    write_atomic(path, lambda f: torch.save(ckpt, f))


def write_atomic(path, write, mode='wb'):
    """write(f) into a temporary file, then rename it to path: a kill mid-write leaves the previous
    file intact (checkpoints, results.json). On Windows the rename fails while another program (a
    virus scanner, a viewer) has path open: it is retried for ~5 s, then a one-line error."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        for wait in (0.1, 0.4, 1.5, 3.0, None):
            try:
                os.replace(tmp, path)
                break
            except PermissionError as e:
                if wait is None:
                    raise UserError(f'cannot replace {path} ({e.strerror}): is it open in another program? '
                                    'Close it and run again (training: --resume continues from the last '
                                    'checkpoint)') from None
                time.sleep(wait)
    finally:                      # an interrupted or failed write leaves no temp file behind
        if os.path.exists(tmp):
            os.remove(tmp)


def read_checkpoint(path, mmap=False):
    """The checkpoint dict, or a one-line error for a missing, truncated, pickled or foreign file.
    A run folder stands for its ckpt.pt; mmap=True only looks: it keeps the config and the plain
    entries (step, stage, ...), and no tensor, since a mapped one holds the file, which Windows
    then cannot replace with the next checkpoint of a resumed run."""
    path = os.path.join(path, 'ckpt.pt') if os.path.isdir(path) else path
    if not os.path.isfile(path):          # an 'each' run's folder (or its missing ckpt.pt): its members have them
        members = sorted(glob.glob(os.path.join(glob.escape(os.path.dirname(path)), '*', 'ckpt.pt')))
        if members and os.path.basename(path) == 'ckpt.pt' and os.path.dirname(path):   # not a mistyped name
            raise UserError(f'no checkpoint in {os.path.dirname(path)}, but in its subfolders (one per category '
                            f'of a --category each run): give one, e.g. {os.path.dirname(members[0])}')
        raise UserError(f'no checkpoint at {path}: train first (--train), or check --out_dir')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or EOFError here
        if 'Unsupported global' in str(e):
            raise UserError(f'{path} holds Python objects, not a checkpoint of this project; '
                            'refusing to unpickle it (it could run code)')
        raise UserError(f'{path} is truncated or not a PyTorch file ({type(e).__name__}); '
                        're-download it or train again')
    if not isinstance(ckpt, dict) or not {'method', 'config', 'model'} <= set(ckpt):
        raise UserError(f'{path} is not a checkpoint of this project (no method/config/model keys)')
    if mmap:
        ckpt = {k: v for k, v in ckpt.items() if k == 'config' or isinstance(v, (bool, int, float, str, type(None)))}
    return current_names(ckpt)


def read_results(path):
    """A results.json of this project, in today's key names, or a one-line error that names the file
    (a truncated one, or another tool's, found by eval.py --compare)."""
    try:
        with open(path) as f:
            return current_names(json.load(f))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f'{path} is not a results.json of this project ({type(e).__name__}: {e}): move it '
                        'elsewhere') from None


def current_names(saved):
    """A checkpoint's or results.json's dict with its config (and cli_keys) in today's key names: a
    method file's RENAMED maps the names of keys it has renamed (old -> new), so that a run saved
    before loads, resumes and compares as it was saved."""
    try:
        renamed = getattr(importlib.import_module(saved['method']), 'RENAMED', {})
    except ImportError:
        return saved                  # not a method here (a baseline, say): import_method says so where it matters
    cfg = {renamed.get(k, k): v for k, v in saved['config'].items()}
    if 'cli_keys' in cfg:
        cfg['cli_keys'] = tuple(renamed.get(k, k) for k in cfg['cli_keys'])
    return dict(saved, config=cfg)


def load(path, Model, overrides=None, device='cpu', ckpt=None):
    """(model in eval mode, ckpt) from a checkpoint of this Model. overrides may change INFER_KEYS and
    run-time keys (device, data_root, ...) only; anything else would need retraining."""
    ckpt = ckpt or read_checkpoint(path)
    final = getattr(Model, 'FINAL_STAGE', None)      # two-stage methods: the stage whose nets score
    if final is not None and ckpt.get('stage', final) != final:
        raise UserError(f"{path} was saved in stage {ckpt['stage']} of training, before the networks that "
                        'score were trained: finish the run with --resume')
    if ckpt.get('final') is False:   # saved mid-run (checkpoints older than this key say nothing)
        warnings.warn(f"{path} was saved at step {ckpt.get('step')}, before training ended: its numbers are "
                      "those of an unfinished model (finish the run with --resume)")
    infer = tuple(getattr(Model, 'INFER_KEYS', ()))         # a method may have none
    for key in overrides or {}:
        if key not in infer + RUNTIME_KEYS:
            raise UserError(f'--{key} cannot change without retraining; inference keys of '
                            f"{method_of(Model)}: {', '.join(infer) or 'none'}")
    cfg = {**saved_config(ckpt, Model), **(overrides or {}), 'device': device}
    _check_values(cfg)
    return _restore(path, Model, cfg, ckpt).eval(), ckpt


def resume(cfg, Model):
    """(model, ckpt) to continue training from out_dir/ckpt.pt. The run keeps the config it was saved
    with (data_root and category included), so it continues exactly whatever the defaults and presets
    say now; keys typed on the command line (cli_keys) still win, each change printed; the device
    picked here and the out_dir the checkpoint was found in (RESUME_KEYS) always apply."""
    path = os.path.join(cfg['out_dir'], 'ckpt.pt')
    ckpt = read_checkpoint(path)
    saved, given = saved_config(ckpt, Model), _given(cfg)
    changed = [k for k in sorted(given - set(RESUME_KEYS)) if k in saved and saved[k] != cfg[k]]
    if 'backbone_weights' in changed:       # typed; every method with a backbone sets it when the run starts
        backbone = saved['backbone_weights'] or 'random init'
        refuse_spent(cfg, saved, ('backbone_weights',), f'its start (its backbone, {backbone}, is in the checkpoint)')
    for key in changed:
        print0(f'resuming with {key} = {cfg[key]!r} (the checkpoint had {saved[key]!r})')
    typed = tuple(dict.fromkeys((*saved.get('cli_keys', ()), *cfg.get('cli_keys', ()))))   # over the run's life
    new = {**saved, **{k: cfg[k] for k in given if k in cfg}, 'cli_keys': typed}
    try:
        model = _restore(path, Model, new, ckpt, old={k: saved[k] for k in changed})
    except UserError as e:
        raise UserError(f"{e} (the network cannot change on --resume; typed: {' '.join('--' + k for k in changed)})"
                        if changed else e)
    print0(f"resuming {path} (preset {saved.get('preset')}) at step {ckpt['step']}" +
           (f" of stage {ckpt['stage']}" if 'stage' in ckpt else ''))
    return model, ckpt


def refuse_spent(cfg, saved, keys, phase):
    """--resume past a phase of a run (its start, a first stage): the keys only that phase reads, typed
    with a new value, would be printed and saved, yet not used. saved: the checkpoint's config."""
    spent = [k for k in keys if k in saved and cfg[k] != saved[k]]
    if spent:
        raise UserError(f"{' '.join('--' + k for k in spent)}: this run is past {phase}, the only part that reads "
                        f"{'them' if spent[1:] else 'it'}; a new value cannot apply on --resume")


def _build(Model, cfg):
    """Model(cfg) from a fixed seed, so that random buffers (codebooks) come out alike in every build."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Model(cfg)


def _check_buffers(model, Model, old_cfg):
    """Buffers (a diffusion schedule, say) are loaded from the checkpoint, so a key typed at --resume
    that changes one would be printed and saved, yet not used: refuse it. model is _build(Model, cfg)
    before the checkpoint is loaded into it; its buffers are compared with those built from old_cfg."""
    before = dict(_build(Model, old_cfg).named_buffers())
    same = lambda a, b: a.shape == b.shape and (torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)
                                                 if a.is_floating_point() else torch.equal(a, b))   # NaN: unset
    moved = [n for n, b in model.named_buffers() if n in before and not same(b, before[n])]
    if moved:
        raise UserError(f"--resume would keep the checkpoint's {', '.join(moved[:3])}, which the config builds")


def load_optimizer(opt, state):
    """opt.load_state_dict(state) for a resume: the checkpoint's moments and step counts, but the
    hyperparameters (lr, betas, weight decay) opt was built with from the config, so that a key typed
    at --resume (--lr, say) applies, as resume() prints. load_state_dict alone would restore the old ones."""
    built = [{k: v for k, v in g.items() if k != 'params'} for g in opt.param_groups]
    opt.load_state_dict(state)
    for group, hyper in zip(opt.param_groups, built):
        group.update(hyper)


def _restore(path, Model, cfg, ckpt, old=None):
    """Model(cfg) holding the checkpoint's weights, or a one-line error if they do not fit; old, the
    saved values of keys typed at --resume, must leave every buffer as it was (_check_buffers)."""
    method = method_of(Model)
    if ckpt['method'] != method:
        raise UserError(f"{path} is a {ckpt['method']} checkpoint; use {ckpt['method']}.py, not {method}.py")
    new = sorted(set(cfg) - set(ckpt['config']) - set(RUNTIME_KEYS))     # see saved_config
    if new:
        print0(f"note: {path} predates {', '.join('--' + k for k in new)}: it runs with "
               f"{' '.join(f'--{k} {cfg[k]!r}' for k in new)}")
    model = _build(Model, cfg)
    if old:
        _check_buffers(model, Model, dict(cfg, **old))
    try:
        missing, unexpected = model.load_state_dict(ckpt['model'], strict=False)
    except RuntimeError as e:   # shape mismatches
        missing, unexpected = [str(e).split('\n')[1].strip()], []
    if missing or unexpected:
        raise UserError(f'{path} does not match this version of {method}.py (different config or '
                        f'code): missing {missing[:3]}, unexpected {unexpected[:3]}')
    return model.to(cfg['device'])


@functools.lru_cache(maxsize=1)
def versions():   # once per process: every checkpoint save would otherwise run git twice
    import torchvision
    try:
        import timm
        timm_version = timm.__version__
    except ImportError:
        timm_version = None
    def git(*args):
        return subprocess.run(['git', *args], capture_output=True, encoding='utf-8', errors='replace',
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    try:   # '-dirty': files differ from that commit or are not in it (a copied method file, say)
        dirty = git('status', '--porcelain')
        commit = git('rev-parse', 'HEAD') + ('-dirty' if dirty else '')
    except OSError:
        commit = ''
    try:   # CPU, vector instructions, threads: each changes floating-point sums, hence a seed's model
        with open('/proc/cpuinfo') as f:
            cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), '')
    except OSError:
        cpu = ''
    cpu = f'{cpu or platform.machine()}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads'
    # the GPU, if this process used one (CUDA): its model decides the ms/image and the training noise
    gpu = f'{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}' if torch.cuda.is_initialized() else ''
    return dict(python=sys.version.split()[0], torch=str(torch.__version__), numpy=str(np.__version__),
                torchvision=str(torchvision.__version__), timm=timm_version, git=commit or 'unknown', cpu=cpu,
                gpu=gpu)

# -----------------------------------------------------------------------------
# data: every sample is a dict(image (3,H,W) in [0,1], mask (1,S,S) in {0,1}, label, cls, path)

MVTEC = ('bottle', 'cable', 'capsule', 'carpet', 'grid', 'hazelnut', 'leather', 'metal_nut', 'pill',
         'screw', 'tile', 'toothbrush', 'transistor', 'wood', 'zipper')
VISA = ('candle', 'capsules', 'cashew', 'chewinggum', 'fryum', 'macaroni1', 'macaroni2', 'pcb1',
        'pcb2', 'pcb3', 'pcb4', 'pipe_fryum')
BTAD = ('01', '02', '03')
SYNTHETIC = ('weave', 'grain', 'washer', 'capsule')
WHERE = {
    'mvtec': 'download MVTec AD from https://www.mvtec.com/company/research/datasets/mvtec-ad and '
             'extract it so that <root>/bottle/train/good/000.png exists',
    'visa': 'download VisA (VisA_20220922.tar, https://github.com/amazon-science/spot-diff) and extract '
            'it so that <root>/split_csv/1cls.csv exists, or give the prepared 1cls folder '
            '(<root>/candle/train/good, test/bad, ground_truth/bad)',
    'btad': 'download BTAD (http://avires.dimi.uniud.it/papers/btad/btad.zip) and extract it so that '
            '<root>/01/train/ok exists',
    'folder': 'give an MVTec-like root: <root>/<category>/train/good, test/<type>, and optionally '
              'ground_truth/<type>/<name>_mask.png',
}
IMAGE_EXT = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')


def categories(data, root=''):
    if data == 'synthetic':
        return SYNTHETIC
    if data == 'folder':
        _check_root(data, root)
        dirs = [d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))]
        found = tuple(sorted(d for d in dirs if os.path.isdir(os.path.join(root, d, 'train'))))
        skipped = sorted(set(dirs) - set(found))
        if skipped and found:
            warnings.warn(f"{root}: {', '.join(skipped)} have no train/ folder, so they are not categories")
        if not found:
            one = os.path.isdir(os.path.join(root, 'train'))      # the root is itself one category
            raise UserError(f'no category folders (<category>/train) in {root}' + (
                f': pass its parent as --data_root and --category {os.path.basename(os.path.normpath(root))}'
                if one else ''))
        return found
    return {'mvtec': MVTEC, 'visa': VISA, 'btad': BTAD}[data]


def _check_root(data, root):
    if data not in WHERE:
        raise UserError(f"unknown data {data!r}; choose synthetic, {', '.join(WHERE)}")
    if not os.path.isdir(root):
        raise UserError(f'{data} dataset not found at {root}: {WHERE[data]}, or pass --data_root')


def _images(folder):
    files = sorted(f for f in glob.glob(os.path.join(glob.escape(folder), '*')) if f.lower().endswith(IMAGE_EXT))
    if not files:
        raise UserError(f'no images in {folder}')
    return files


def _list_mvtec(root, cat, split, good, masks_required):
    """(image, label, mask-or-None) records of an MVTec-like category; masks are <stem>_mask.* or
    <stem>.* in ground_truth/<type>/, and may be absent entirely (then only image metrics)."""
    if split == 'train':
        return [(f, 0, None) for f in _images(os.path.join(root, cat, 'train', good))]
    test = os.path.join(root, cat, 'test')
    if not os.path.isdir(test):
        raise UserError(f'no test folder {test}')
    has_gt = os.path.isdir(os.path.join(root, cat, 'ground_truth'))
    if masks_required and not has_gt:
        raise UserError(f"no ground_truth folder in {os.path.join(root, cat)}")
    records = []
    for kind in sorted(os.listdir(test)):
        normal = os.path.normcase(kind) == os.path.normcase(good)      # 'Good' too where train/good finds it
        for f in _images(os.path.join(test, kind)) if os.path.isdir(os.path.join(test, kind)) else []:
            if normal:
                records.append((f, 0, None))
                continue
            stem = os.path.splitext(os.path.basename(f))[0]
            gt = os.path.join(root, cat, 'ground_truth', kind)
            found = [m for m in glob.glob(os.path.join(glob.escape(gt), glob.escape(stem) + '*')) if m.lower().endswith(
                IMAGE_EXT) and os.path.splitext(os.path.basename(m))[0] in (stem, stem + '_mask')]
            if has_gt and len(found) != 1:
                what = f"{len(found)} masks: {', '.join(found)}" if found else f'no mask {stem}_mask.png or {stem}.png'
                raise UserError(f'image/mask mismatch: {f} has {what} in {gt}')
            records.append((f, 1, found[0] if found else None))
    return records


def _list_visa_raw(root, cat, split):
    path = os.path.join(root, 'split_csv', '1cls.csv')
    with open(path, newline='', encoding='utf-8-sig') as f:      # -sig: a csv re-saved by a spreadsheet
        table = csv.DictReader(f)
        if not {'object', 'split', 'label', 'image', 'mask'} <= set(table.fieldnames or ()):
            raise UserError(f'{path} needs the columns object,split,label,image,mask (has {table.fieldnames})')
        rows = [r for r in table if r['object'] == cat and r['split'] == split]
    if not rows:
        raise UserError(f'no {split} rows for {cat} in {path}')
    records = [(os.path.join(root, r['image']), int(r['label'] != 'normal'),
                os.path.join(root, r['mask']) if r['mask'] else None) for r in rows]
    missing = [f for r in records for f in (r[0], r[2]) if f and not os.path.isfile(f)]
    if missing:       # found now (check_data), not when the test set is read after training
        raise UserError(f'{len(missing)} files listed in {path} are missing, e.g. {missing[0]}')
    return records


def _list(data, root, cat, split):
    if data == 'visa' and os.path.isfile(os.path.join(root, 'split_csv', '1cls.csv')):
        return _list_visa_raw(root, cat, split)
    if data != 'folder' and not os.path.isdir(os.path.join(root, cat)):
        have = [c for c in categories(data) if os.path.isdir(os.path.join(root, c))]
        if have:          # a partial copy: say what is there
            raise UserError(f"{root} has no {cat} folder, only {len(have)} of the {len(categories(data))} {data} "
                            f"categories ({', '.join(have)}): extract {cat} there, or pick one with --category")
        raise UserError(f'{root} has no {cat} folder, so it is not {data}: {WHERE[data]}; for another '
                        'MVTec-like dataset use --data folder')
    good = 'ok' if data == 'btad' else 'good'
    if data == 'folder' and not os.path.isdir(os.path.join(root, cat, 'train', good)) and os.path.isdir(
            os.path.join(root, cat, 'train', 'ok')):
        raise UserError(f"{os.path.join(root, cat, 'train')} has ok/, not good/: for BTAD use --data btad")
    return _list_mvtec(root, cat, split, good, masks_required=data != 'folder')


MASK_RULE = 'nearest resize; mask > 0.5 (8-bit > 127; masks whose values are all < 128: > 0, class ids)'


def _read(src, size, mask=False):
    """An image file or an in-memory uint8 array -> (3,size,size) RGB uint8 (bilinear), or a
    (1,size,size) {0,1} mask by MASK_RULE, over the max of the colour channels (RGB masks; VisA's
    class-id masks hold small ids, so > 0). 16-bit images are scaled to 8 bits, not clipped. A
    camera's EXIF orientation is applied (the image as viewed, which is where masks are drawn)."""
    try:
        im = Image.fromarray(src) if isinstance(src, np.ndarray) else Image.open(src)
        ImageOps.exif_transpose(im, in_place=True)
        if im.mode.startswith('I') or im.mode == 'F':   # 16/32-bit greyscale -> 8 bits (a 16-bit or [0,1]
            a = np.asarray(im, np.float64)             # mask too, so that its 0.5 is 127; not class ids)
            bits16 = ((im.mode.startswith('I;16') or im.format == 'PNG') and not mask) or a.max() > 255
            a = a / 257 if bits16 else a * 255 if a.max() <= 1 else a   # Pillow < 10.3 opens 16-bit PNGs as 'I'
            im = Image.fromarray(np.uint8(np.clip(np.round(a), 0, 255)))
        if mask:   # channels -> max, alpha ignored; > 127, or > 0 for class ids (a file all below 128):
            grey = lambda a: (a[..., :-1] if 'A' in im.mode else a).max(-1) if a.ndim == 3 else a
            cut = 127 if grey(np.asarray(im)).max() >= 128 else 0   # on the file: a resize may drop a small core
            return (grey(np.asarray(im.resize((size, size), Image.NEAREST))) > cut).astype(np.uint8)[None]
        im = im.convert('RGB').resize((size, size), Image.BILINEAR)
    except (OSError, ValueError) as e:
        raise UserError(f'cannot read {src}: {e}')
    return np.asarray(im).transpose(2, 0, 1)


class ADDataset(torch.utils.data.Dataset):
    """Decoded, resized images kept in memory as uint8: images (N,3,H,W), masks (N,1,S,S) at the
    protocol size S (eval_size), labels, cls (index into .categories), paths relative to root."""

    def __init__(self, images, masks, labels, cls, paths, categories, has_masks):
        self.images, self.masks = torch.as_tensor(images), torch.as_tensor(masks)
        self.labels, self.cls = torch.as_tensor(labels), torch.as_tensor(cls)
        self.paths, self.categories, self.has_masks = list(paths), list(categories), dict(has_masks)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return dict(image=self.images[i].float() / 255, mask=self.masks[i].float(),
                    label=int(self.labels[i]), cls=int(self.cls[i]), path=self.paths[i])

    def subset(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.long)
        return ADDataset(self.images[idx], self.masks[idx], self.labels[idx], self.cls[idx],
                         [self.paths[i] for i in idx.tolist()], self.categories, self.has_masks)


def load_dataset(cfg, split):
    """split: 'train' (train/good minus the validation share), 'val' or 'test'. cfg needs data,
    data_root, category ('all' = every category), image_size, eval_size, seed, val_frac."""
    cats = _categories_of(cfg)
    parts = [_load_category(cfg, c, cats.index(c), split) for c in cats]
    cat_fields = [np.concatenate([p[k] for p in parts]) for k in range(5)]
    return ADDataset(*cat_fields[:4], [q for p in parts for q in p[4]], cats,
                     {c: p[5] for c, p in zip(cats, parts)})


def _categories_of(cfg):
    """The categories cfg['category'] stands for ('all' and 'each': every one), or a one-line error."""
    data, root, cat = cfg['data'], cfg['data_root'], cfg['category']
    if data != 'synthetic':
        _check_root(data, root)
    if cat == 'all' and cfg.get('categories'):   # a trained model's (run() records them): same class ids
        return tuple(cfg['categories'])
    valid = categories(data, root)
    if cat not in valid and cat not in ('all', 'each'):
        close = difflib.get_close_matches(cat, valid, n=1)
        raise UserError(f"unknown category {cat!r} for {data}" + (f' (did you mean {close[0]!r}?)'
                        if close else '') + f"; valid: all, each, {', '.join(valid)}")
    return valid if cat in ('all', 'each') else (cat,)


def check_data(cfg):
    """List the train and test files of every category the run needs and read the test files' headers
    (without decoding), so that a missing folder, an image or mask PIL cannot open, or a mask shaped
    unlike its image is an error before training, not after it."""
    cats = _categories_of(cfg)
    for cat in cats if cfg['data'] != 'synthetic' else ():
        _list(cfg['data'], cfg['data_root'], cat, 'train')       # decoded before training anyway
        _check_shapes(_list(cfg['data'], cfg['data_root'], cat, 'test'))


def _load_category(cfg, cat, ci, split):
    """One category: (images, masks, labels, cls, paths, has_masks), decoded in threads."""
    part = 'test' if split == 'test' else 'train'
    if cfg['data'] == 'synthetic':
        images, masks, labels, paths = synthetic(cat, part)
        records = [(x.transpose(1, 2, 0), y, m[0] if y else None) for x, m, y in zip(images, masks, labels)]
    else:
        records = _list(cfg['data'], cfg['data_root'], cat, part)
        paths = [path_key(r[0], cfg['data_root']) for r in records]
    if split != 'test':   # the validation split: a seeded share of train/good, per category
        order = np.random.default_rng(key_seed(cfg['seed'], 'val', cat)).permutation(len(records))
        n_val = int(round(cfg['val_frac'] * len(records)))
        keep = np.sort(order[:n_val] if split == 'val' else order[n_val:])
        records, paths = [records[i] for i in keep], [paths[i] for i in keep]
    if not records:
        raise UserError(f"the {split} split of {cat} is empty (val_frac {cfg['val_frac']})")
    size, msize = cfg['image_size'], cfg['eval_size']
    empty = np.zeros((1, msize, msize), np.uint8)
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:   # PIL releases the GIL
        images = np.stack(list(pool.map(lambda r: _read(r[0], size), records)))
        masks = np.stack(list(pool.map(lambda r: empty if r[2] is None else _read(r[2], msize, True), records)))
    labels = np.array([r[1] for r in records])
    if split == 'test':
        _check_masks(cat, records, masks)
    return images, masks, labels, np.full(len(records), ci), paths, any(r[2] is not None for r in records)


def path_key(path, root):
    """A file's path relative to the data root, with '/' on every OS: the key that seeds its test-time
    noise (so Windows and Linux, evaluation and eval.py --predict draw the same); a file outside the
    root (a relative root is taken from the working directory) is keyed by its name."""
    for norm in (os.path.abspath, os.path.realpath):              # as given, then through symlinks
        p, r = norm(path), os.path.join(norm(root), '')
        if os.path.normcase(p).startswith(os.path.normcase(r)):
            return p[len(r):].replace(os.sep, '/')
    return os.path.basename(path)


def _shape(path):
    """(width, height) of an image file as viewed (EXIF orientation applied), from its header."""
    try:
        with Image.open(path) as im:
            return im.size[::-1] if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else im.size
    except (OSError, ValueError) as e:
        raise UserError(f'cannot read {path}: {e}')


def _check_shapes(records):
    """Every image and mask opens, and no mask is shaped unlike its image (it would be stretched)."""
    for image, _, mask in records:
        if not isinstance(image, str):            # the synthetic benchmark's arrays
            continue
        w, h = _shape(image)
        if isinstance(mask, str):
            mw, mh = _shape(mask)
            if abs(w * mh - h * mw) > 0.01 * w * mh:
                raise UserError(f'the mask {mask} is {mw}x{mh} but its image {image} is {w}x{h}')


def _check_masks(cat, records, masks):
    """_check_shapes of the images with a mask file (all images are decoded by now); and warn when masks
    of anomalous images decode empty or nearly full (a format read wrong: a defect kept only in alpha,
    an inverted palette), or vanish at the protocol size (defects under a pixel there)."""
    _check_shapes([r for r in records if isinstance(r[2], str)])
    cover = masks.reshape(len(masks), -1).mean(1)
    odd = [r[2] for r, c in zip(records, cover) if r[1] and r[2] is not None and not 0 < c < 0.9]
    if odd:
        warnings.warn(f'{len(odd)} masks of anomalous {cat} images are empty or cover > 90% of the image at '
                      f'{masks.shape[-1]} px, e.g. {odd[0]}: check their format ({MASK_RULE})')


class _Keyed(torch.utils.data.Dataset):
    """Sample (step, j, index) of a training stream; its augmentation rng is seeded by (seed, step,
    j), so the stream is a pure function of the seed (exact resume, any number of workers)."""

    def __init__(self, dataset, transform, seed):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __getitem__(self, key):
        step, j, i = key
        sample = self.dataset[i]
        if self.transform is not None:
            sample = self.transform(sample, np.random.default_rng(key_seed(self.seed, 'aug', step, j)))
        return sample


def _batch_keys(n, batch_size, seed, start_step, rank, world):
    """Global batch of step s = positions [s*B, (s+1)*B) of the concatenated per-epoch permutations
    (epoch e shuffled by (seed, e)); rank r takes its contiguous share of that batch."""
    per_rank = batch_size // world
    step = start_step
    while True:
        first = step * batch_size + rank * per_rank
        keys = []
        for pos in range(first, first + per_rank):
            epoch, k = divmod(pos, n)
            perm = np.random.default_rng(key_seed(seed, 'epoch', epoch)).permutation(n)
            keys.append((step, pos - step * batch_size, int(perm[k])))
        yield keys
        step += 1


def train_batches(dataset, cfg, start_step=0, transform=None, size_key='batch_size'):
    """Endless iterator of training batches of cfg[size_key] (global) from start_step on, identical
    whether or not training was interrupted. transform(sample, rng) may add a synthetic anomaly
    (perlin_anomaly). size_key names the flag in the error a user gets under torchrun."""
    rank, world = rank_world()
    if cfg[size_key] % world:
        raise UserError(f"--{size_key} {cfg[size_key]} must be divisible by the {world} ranks")
    sampler = _batch_keys(len(dataset), cfg[size_key], cfg['seed'], start_step, rank, world)
    loader = torch.utils.data.DataLoader(
        _Keyed(dataset, transform, cfg['seed']), batch_sampler=sampler, num_workers=cfg['num_workers'],
        pin_memory='cuda' in cfg['device'], persistent_workers=cfg['num_workers'] > 0)
    return iter(loader)

# -----------------------------------------------------------------------------
# the built-in synthetic benchmark (frozen: changing anything here changes SYNTHETIC_VERSION and
# the hash pinned in tests). Two textures (weave, grain) and two objects (washer, capsule) with
# normal variation a per-pixel model cannot absorb: random texture phase, free washer rotation,
# capsules either way round, +-7 px shifts, uneven lighting, colour cast, sensor noise. Test defects
# (scratch, hole, dent, stain, colour, missing, extra, foreign) are shapes the Perlin training
# synthesis never makes; each is redrawn until it covers >= 30 px with a mean contrast >= 0.08.

SYNTHETIC_VERSION = 1
SYN_SIZE, SYN_TRAIN, SYN_NORMAL, SYN_ANOMALOUS = 128, 160, 40, 60
DEFECTS = ('scratch', 'hole', 'dent', 'stain', 'colour', 'missing', 'extra', 'foreign')
_Y, _X = np.mgrid[0:SYN_SIZE, 0:SYN_SIZE].astype(np.float64)


def _noise(rng, cells, size=SYN_SIZE):
    """Smooth value noise in [0,1]: a random (cells+1)^2 grid, smoothstep-interpolated."""
    g = rng.random((cells + 1, cells + 1))
    t = np.arange(size) * cells / size
    i = t.astype(int)
    f = t - i
    f = f * f * (3 - 2 * f)
    rows = g[i] * (1 - f)[:, None] + g[i + 1] * f[:, None]
    return rows[:, i] * (1 - f) + rows[:, i + 1] * f


def _disc(cx, cy, rx, ry=None, angle=0.0, wobble=None):
    """Anti-aliased coverage (H,W) of an ellipse, optionally with a wobbly radius."""
    ry = rx if ry is None else ry
    c, s = np.cos(angle), np.sin(angle)
    u, v = (_X - cx) * c + (_Y - cy) * s, -(_X - cx) * s + (_Y - cy) * c
    r = np.hypot(u / rx, v / ry)
    if wobble is not None:
        r = r / (1 + wobble(np.arctan2(v, u)))
    return np.clip((1 - r) * min(rx, ry) + 0.5, 0, 1)


def _curve(rng, cx, cy, length, width):
    """Coverage of a thick quadratic Bezier curve of the given length around (cx, cy)."""
    a = rng.uniform(0, np.pi)
    d = np.array([np.cos(a), np.sin(a)]) * length / 2
    bend = rng.normal(0, length / 4, 2)
    p0, p2, p1 = np.array([cx, cy]) - d, np.array([cx, cy]) + d, np.array([cx, cy]) + bend
    t = np.linspace(0, 1, 48)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t ** 2 * p2
    dist = np.min(np.hypot(_X[None] - pts[:, 0, None, None], _Y[None] - pts[:, 1, None, None]), 0)
    return np.clip(width / 2 + 0.5 - dist, 0, 1)


def _weave(rng):
    """A plain-weave texture: warp and weft threads every 4 px, random phase and slight tilt."""
    a = rng.normal(0, 0.03)
    u = _X * np.cos(a) + _Y * np.sin(a) + rng.uniform(0, 8)
    v = -_X * np.sin(a) + _Y * np.cos(a) + rng.uniform(0, 8)
    warp, weft = np.sin(np.pi * u / 4) ** 2, np.sin(np.pi * v / 4) ** 2
    over = np.sin(np.pi * u / 8) * np.sin(np.pi * v / 8) > 0            # plain weave: over/under
    p = np.where(over, warp, weft) * 0.8 + 0.2 * _noise(rng, 32)
    base = np.array([0.58, 0.47, 0.34]) + rng.normal(0, 0.015, 3)
    return base * (0.72 + 0.42 * p[..., None])


def _grain(rng):
    """A stone-like texture: value noise at three scales plus light and dark specks."""
    n = 0.5 * _noise(rng, 4) + 0.3 * _noise(rng, 10) + 0.2 * _noise(rng, 32)
    speck = (_noise(rng, 64) > 0.85) * 0.12 - (_noise(rng, 64) > 0.87) * 0.12
    c0, c1 = np.array([0.62, 0.6, 0.58]), np.array([0.36, 0.33, 0.32])
    return c0 + (c1 - c0) * np.clip(1.6 * n - 0.3, 0, 1)[..., None] + speck[..., None]


def _washer(rng, cx, cy):
    """A freely rotated metal ring with a key notch on a dark background: (object, cover, bg)."""
    bg = np.array([0.16, 0.16, 0.18]) + 0.03 * _noise(rng, 8)[..., None]
    rho, ang = np.hypot(_X - cx, _Y - cy), np.arctan2(_Y - cy, _X - cx)
    key = rng.uniform(-np.pi, np.pi)                                      # free rotation
    notch = (np.abs(np.angle(np.exp(1j * (ang - key)))) < 0.22) & (rho < 27)
    cover = np.clip(42 - rho + 0.5, 0, 1) * np.clip(rho - 19 + 0.5, 0, 1) * (1 - notch)
    shade = 0.62 + 0.2 * np.cos(ang - 0.8) + 0.04 * np.sin(rho * 2.1)
    return np.array([0.72, 0.72, 0.75]) * shade[..., None], cover, bg


def _capsule(rng, cx, cy):
    """A two-colour printed capsule, either way round, on a light background: (object, cover, bg)."""
    bg = np.array([0.84, 0.84, 0.8]) + 0.02 * _noise(rng, 8)[..., None]
    a = rng.normal(0, 0.07) + np.pi * (rng.random() < 0.5)              # either way round
    u = (_X - cx) * np.cos(a) + (_Y - cy) * np.sin(a)
    v = -(_X - cx) * np.sin(a) + (_Y - cy) * np.cos(a)
    d = np.hypot(np.clip(np.abs(u) - 26, 0, None), v)                     # stadium: 2*26 + 2*17
    cover = np.clip(17 - d + 0.5, 0, 1)
    shade = 0.7 + 0.3 * np.sqrt(np.clip(1 - (v / 17) ** 2, 0, 1))
    left = np.array([0.78, 0.22, 0.2]) + rng.normal(0, 0.02, 3)
    right = np.array([0.93, 0.88, 0.68]) + rng.normal(0, 0.02, 3)
    obj = np.where((u < 0)[..., None], left, right) * shade[..., None]
    ink = sum(np.clip(1.6 - np.hypot(np.clip(np.abs(u - x0) - 3, 0, None), v), 0, 1)
              for x0 in (12, 22, 32))                                     # three printed dashes
    return obj * (1 - 0.55 * np.clip(ink, 0, 1))[..., None], cover, bg


def _render(cat, rng):
    """A clean normal sample: (rgb float image, object coverage or None, background or None)."""
    if cat in ('weave', 'grain'):
        return dict(weave=_weave, grain=_grain)[cat](rng), None, None
    cx, cy = SYN_SIZE / 2 + rng.uniform(-7, 7, 2)                         # +-7 px shifts
    obj, cover, bg = dict(washer=_washer, capsule=_capsule)[cat](rng, cx, cy)
    return bg + (obj - bg) * cover[..., None], cover, bg


def _light(img, rng):
    """Normal variation of the acquisition: gain, illumination gradient, colour cast, sensor noise."""
    g = rng.uniform(0.85, 1.15)
    a = rng.uniform(0, 2 * np.pi)
    grad = rng.uniform(0, 0.16) * ((_X - 64) * np.cos(a) + (_Y - 64) * np.sin(a)) / 64
    img = img * g * (1 + grad[..., None]) + rng.normal(0, 0.012, 3)
    return img + rng.normal(0, 0.012, img.shape)


def _spot(rng, region):
    """A random pixel (x, y) of a boolean (H,W) region."""
    ys, xs = np.nonzero(region)
    k = rng.integers(len(xs))
    return xs[k], ys[k]


def _missing_or_extra(kind, img, cover, bg, rng, cx, cy):
    """Material gone or added, which means one thing on a texture (a worn patch, a stray fibre) and
    another on an object (a bite out of the rim, excess material beside it): (alpha, target)."""
    if cover is None:
        mean = img.reshape(-1, 3).mean(0)
        if kind == 'missing':                                             # worn: pattern gone
            alpha = _disc(cx, cy, rng.uniform(8, 16), rng.uniform(8, 16), rng.uniform(0, np.pi))
            return alpha, np.broadcast_to(mean * rng.uniform(0.85, 1.15), img.shape)
        alpha = _curve(rng, cx, cy, rng.uniform(18, 36), rng.uniform(3, 5))   # a stray thick fibre
        return alpha, np.broadcast_to(mean * rng.uniform(0.5, 1.5), img.shape)
    x, y = _spot(rng, (cover > 0.3) & (cover < 0.7))                      # a point on the rim
    if kind == 'missing':                                                 # a bite out of it
        return _disc(x, y, rng.uniform(6, 12)) * cover, bg
    return _disc(x, y, rng.uniform(6, 11)) * (1 - cover), np.broadcast_to(img[y, x], img.shape)   # excess


def _defect(kind, img, cover, bg, rng):
    """Apply one defect to a clean image; returns (image, coverage alpha of the defect)."""
    if cover is None:
        cx, cy = rng.uniform(16, SYN_SIZE - 16, 2)
    else:
        cx, cy = _spot(rng, cover > 0.99)                                 # on the object
    sign = rng.choice([-1.0, 1.0])
    if kind == 'scratch':
        alpha = _curve(rng, cx, cy, rng.uniform(20, 48), rng.uniform(1.8, 3.2))
        target = img + sign * rng.uniform(0.12, 0.45)
    elif kind == 'hole':
        alpha = _disc(cx, cy, rng.uniform(3.5, 8), rng.uniform(3.5, 8), rng.uniform(0, np.pi))
        target = np.full_like(img, rng.uniform(0.03, 0.2))
    elif kind == 'dent':
        r = rng.uniform(7, 13)
        alpha = _disc(cx, cy, r)
        a = rng.uniform(0, 2 * np.pi)
        ramp = ((_X - cx) * np.cos(a) + (_Y - cy) * np.sin(a)) / r
        target = img * (1 + rng.uniform(0.2, 0.5) * np.clip(ramp, -1, 1))[..., None]
    elif kind == 'stain':
        ph = rng.uniform(0, 2 * np.pi, 3)
        wob = lambda t: 0.25 * np.sin(3 * t + ph[0]) + 0.15 * np.sin(5 * t + ph[1])
        alpha = _disc(cx, cy, rng.uniform(7, 15), rng.uniform(7, 15), ph[2], wob)
        tint = rng.normal(0, 1, 3)
        target = img * (1 + rng.uniform(0.15, 0.45) * tint / np.linalg.norm(tint))
    elif kind == 'colour':
        alpha = _disc(cx, cy, rng.uniform(10, 20), rng.uniform(10, 20), rng.uniform(0, np.pi))
        grey = img.mean(-1, keepdims=True)
        target = grey + (img - grey) * rng.uniform(-0.5, 0.4) + sign * rng.uniform(0.05, 0.14)
    elif kind in ('missing', 'extra'):
        alpha, target = _missing_or_extra(kind, img, cover, bg, rng, cx, cy)
    else:                                                                 # foreign texture patch
        alpha = _disc(cx, cy, rng.uniform(7, 15), rng.uniform(7, 15), rng.uniform(0, np.pi))
        a, period = rng.uniform(0, np.pi), rng.uniform(3, 6)
        stripes = np.sin(2 * np.pi * (_X * np.cos(a) + _Y * np.sin(a)) / period)
        target = img * (1 + rng.uniform(0.25, 0.5) * stripes[..., None])
    alpha = alpha * (cover if cover is not None and kind not in ('missing', 'extra') else 1)
    return img + (target - img) * alpha[..., None], alpha


@functools.lru_cache(maxsize=8)
def synthetic(cat, split):
    """The frozen benchmark: (images (N,3,128,128) uint8, masks (N,1,128,128), labels, paths).
    Every image is a pure function of (version, category, split, index)."""
    n = SYN_TRAIN if split == 'train' else SYN_NORMAL + SYN_ANOMALOUS
    images, masks, labels, paths = [], [], [], []
    for i in range(n):
        rng = np.random.default_rng(key_seed(SYNTHETIC_VERSION, cat, split, i))
        img, cover, bg = _render(cat, rng)
        kind = 'good' if split == 'train' or i < SYN_NORMAL else DEFECTS[i % len(DEFECTS)]
        mask = np.zeros((SYN_SIZE, SYN_SIZE), bool)
        if kind != 'good':
            for _ in range(100):      # redraw until the defect is visible: area and contrast
                bad, alpha = _defect(kind, img, cover, bg, rng)
                mask = alpha > 0.5
                contrast = np.abs(bad - img).max(-1)[mask].mean() if mask.sum() else 0
                if mask.sum() >= 30 and contrast >= 0.08:
                    break
            img = bad
        img = _light(img, rng)
        images.append(np.clip(np.round(img * 255), 0, 255).astype(np.uint8).transpose(2, 0, 1))
        masks.append(mask[None].astype(np.uint8))
        labels.append(int(kind != 'good'))
        paths.append(f"{cat}/{split}/{kind}/{i:03d}.png")
    return np.stack(images), np.stack(masks), np.array(labels), paths

# -----------------------------------------------------------------------------
# Perlin anomaly synthesis for training (DRAEM recipe, as DiffusionAD and LASB use it)


def perlin_noise(rng, h, w, res):
    """2-D Perlin noise (DRAEM's rand_perlin_2d): random unit gradients on a (res+1)^2 lattice,
    quintic fade 6t^5 - 15t^4 + 10t^3, scaled by sqrt(2); any h, w."""
    ang = rng.uniform(0, 2 * np.pi, (res[0] + 1, res[1] + 1))
    y, x = np.arange(h) * res[0] / h, np.arange(w) * res[1] / w
    yi, xi, yf, xf = y.astype(int), x.astype(int), (y % 1)[:, None], (x % 1)[None]

    def corner(dy, dx):   # gradient at lattice corner (dy, dx) dotted with the offset to it
        a = ang[yi[:, None] + dy, xi[None] + dx]
        return np.cos(a) * (yf - dy) + np.sin(a) * (xf - dx)
    u, v = (t * t * t * (t * (t * 6 - 15) + 10) for t in (xf, yf))
    top, bottom = corner(0, 0) + u * (corner(0, 1) - corner(0, 0)), corner(1, 0) + u * (corner(1, 1) - corner(1, 0))
    return np.sqrt(2) * (top + v * (bottom - top))


def _hue_sat(im, rng):
    hsv = np.asarray(im.convert('HSV')).astype(int)
    hsv[..., 0] = (hsv[..., 0] + rng.integers(-50, 51)) % 256
    hsv[..., 1] = np.clip(hsv[..., 1] + rng.integers(-50, 51), 0, 255)
    return Image.fromarray(hsv.astype(np.uint8), 'HSV').convert('RGB')


_AUGMENTERS = (   # DRAEM's ten colour/geometry augmenters; three are applied in random order
    lambda im, r: Image.fromarray(np.uint8(255 * (np.asarray(im) / 255) ** r.uniform(0.5, 2, 3))),
    lambda im, r: Image.fromarray(np.uint8(np.clip(np.asarray(im) * r.uniform(0.8, 1.2)
                                                   + r.uniform(-30, 30), 0, 255))),
    lambda im, r: ImageEnhance.Sharpness(im).enhance(r.uniform(0, 2)),
    _hue_sat,
    lambda im, r: ImageOps.solarize(im, int(r.integers(32, 129))),
    lambda im, r: ImageOps.posterize(im, int(r.integers(4, 9))),
    lambda im, r: ImageOps.invert(im),
    lambda im, r: ImageOps.autocontrast(im),
    lambda im, r: ImageOps.equalize(im),
    lambda im, r: im.rotate(r.uniform(-45, 45)),
)


@functools.lru_cache(maxsize=4)
def _dtd_files(root):
    files = sorted(glob.glob(os.path.join(glob.escape(root), 'images', '*', '*.jpg')))
    if not files:
        raise UserError(f'no DTD images at {root}/images/*/*.jpg: download DTD from '
                        'https://www.robots.ox.ac.uk/~vgg/data/dtd/ or leave --dtd_root empty')
    return files


def _appearance(image, rng, dtd_root, dtd_self=0.0):
    """The anomaly source A (H,W,3 uint8): a DTD image (with probability dtd_self a strip-shuffled
    copy of the image itself instead), else a procedural Perlin colour texture or a self copy, half
    and half; then three random augmenters."""
    h, w = image.shape[:2]
    if dtd_root:
        self_copy = dtd_self > 0 and rng.random() < dtd_self
    else:
        self_copy = rng.random() >= 0.5
    if self_copy:
        a = image
    elif dtd_root:
        a = _read(_dtd_files(dtd_root)[rng.integers(len(_dtd_files(dtd_root)))], h).transpose(1, 2, 0)
    else:
        t = np.clip(perlin_noise(rng, h, w, 2 ** rng.integers(1, 6, 2)) + 0.5, 0, 1)[..., None]
        c0, c1 = rng.random(3), rng.random(3)
        a = np.uint8(255 * (c0 + (c1 - c0) * t))
    im = Image.fromarray(a)
    for k in rng.permutation(len(_AUGMENTERS))[:3]:
        im = _AUGMENTERS[k](im, rng)
    a = np.asarray(im)
    if self_copy:   # shuffle 8 vertical, then 8 horizontal strips, so most parts move (one permutation of
        # all 8; DiffusionAD's official code shuffles the even- and the odd-indexed strips apart)
        for axis in (1, 0):
            parts = np.array_split(a, 8, axis)
            a = np.concatenate([parts[i] for i in rng.permutation(8)], axis)
    return a


def perlin_anomaly(sample, rng, p=0.5, beta=(0.2, 0.8), dtd_root='', fg=None, dtd_self=0.0):
    """With probability p, paste a Perlin-shaped anomaly into sample['image'] ((3,H,W) in [0,1],
    before any normalisation): scales 2^0..2^5 per axis, rotation +-90 deg, threshold 0.5, times
    the optional foreground mask fg (H,W); S = (1-M) N + M (b N + (1-b) A), b ~ U(beta)
    (DiffusionAD Eq. 12), A from _appearance. Returns the sample with image, mask (1,H,W) and
    label replaced."""
    x = sample['image']
    h, w = x.shape[1:]
    mask = np.zeros((h, w), np.float32)
    if rng.random() < p:
        for _ in range(50):   # redraw empty masks, as DRAEM and DiffusionAD do
            noise = perlin_noise(rng, h, w, 2 ** rng.integers(0, 6, 2))
            m = ndimage.rotate(noise, rng.uniform(-90, 90), reshape=False, order=1) > 0.5
            m = m & (True if fg is None else np.asarray(fg) > 0.5)
            if m.any():
                mask = m.astype(np.float32)
                break
    if mask.any():
        n = np.uint8(np.round(x.numpy().transpose(1, 2, 0) * 255))
        a = torch.from_numpy(_appearance(n, rng, dtd_root, dtd_self).transpose(2, 0, 1).copy()).float() / 255
        b, m = rng.uniform(*beta), torch.from_numpy(mask)[None]
        x = (1 - m) * x + m * (b * x + (1 - b) * a)
    return dict(sample, image=x, mask=torch.from_numpy(mask)[None], label=int(mask.any()))

# -----------------------------------------------------------------------------
# metrics: one sort of the scores gives AUROC, AP (step-wise, as scikit-learn), F1-max and AUPRO


def _curves(y, s):
    """Sort once (descending); cumulative true/false positives at every distinct threshold."""
    if len(y) != len(s):
        raise ValueError(f'{len(y)} labels but {len(s)} scores (one per image, or per mask and map pixel)')
    s, order = torch.from_numpy(np.ascontiguousarray(s)).sort(descending=True)   # faster than np.argsort on 2 cores
    s, order = s.numpy(), order.numpy()
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]   # last index of each threshold
    tps = np.cumsum(y[order], dtype=np.int64)[last]
    return order, last, tps, last + 1 - tps


def _auroc_ap_f1(tps, fps):
    """Exact integer sums: AUROC = trapezoids under (fpr, tpr); AP = sum (R_k - R_k-1) P_k as
    scikit-learn; F1 = 2 TP / (TP + FP + P) = 2PR / (P + R), maximised over thresholds."""
    pos, neg = tps[-1], fps[-1]
    auroc = np.dot(np.diff(fps, prepend=0), tps + np.r_[0, tps[:-1]]) / (2 * pos * neg)
    ap = np.dot(np.diff(tps, prepend=0), tps / (tps + fps)) / pos
    f1 = np.max(2 * tps / (tps + fps + pos))
    return float(auroc), float(ap), float(f1)


def _degenerate(y, s, what):
    if not np.isfinite(s).all():
        warnings.warn(f'{what}: non-finite scores; metrics are NaN')
        return True
    if y.all() or not y.any():
        warnings.warn(f"{what}: the test set has {'no normal' if y.all() else 'no anomalous'} "
                      'samples; metrics are undefined (NaN)')
        return True
    if s.min() == s.max():
        warnings.warn(f'{what}: every score is the same ({s.min()}); the model is not ranking')
    return False


def image_metrics(labels, scores):
    y, s = np.asarray(labels).astype(bool), np.asarray(scores, np.float64)
    if _degenerate(y, s, 'image metrics'):
        return dict(image_auroc=np.nan, image_ap=np.nan, image_f1max=np.nan)
    _, _, tps, fps = _curves(y, s)
    return dict(zip(('image_auroc', 'image_ap', 'image_f1max'), _auroc_ap_f1(tps, fps)))


def trapezoid(x, y, x_max=None):
    """Area under y(x) up to x_max, adding the linearly interpolated piece up to x_max when x_max
    falls between two points (the official MVTec AD evaluation's generic_util.trapezoid)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    correction = 0.0
    if x_max is not None:
        if x_max not in x:
            i = np.searchsorted(x, x_max)   # bisect: x[i-1] < x_max < x[i]
            y_max = y[i - 1] + (y[i] - y[i - 1]) * (x_max - x[i - 1]) / (x[i] - x[i - 1])
            correction = 0.5 * (y_max + y[i - 1]) * (x_max - x[i - 1])
        keep = x <= x_max
        x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def _pro_increments(masks):
    """Per pixel 1/|region| inside each 8-connected ground-truth region, 0 outside; region count."""
    inc, regions = np.zeros(masks.shape, np.float64), 0
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, np.ones((3, 3)))
        if n:
            inc[i] = np.where(lab > 0, 1.0 / np.bincount(lab.ravel())[lab], 0.0)
            regions += n
    return inc.ravel(), regions


def _aupro(order, last, fps, masks, limit):
    inc, regions = _pro_increments(masks)
    pros = np.minimum(np.cumsum(inc[order])[last] / regions, 1.0)
    fprs = np.minimum(fps / fps[-1], 1.0)
    return trapezoid(np.r_[0, fprs, 1], np.r_[0, pros, 1], x_max=limit) / limit


def pixel_metrics(masks, maps, limit=0.3):
    """Pixel AUROC, AP, F1-max and AUPRO over all pixels of all maps (normal images included).
    AUPRO is the official MVTec AD one: every score is a threshold, FPR over all normal pixels,
    PRO = mean overlap over 8-connected regions, integrated to FPR=limit and divided by limit."""
    y, s = np.asarray(masks).astype(bool), np.asarray(maps, np.float32).ravel()
    if _degenerate(y.ravel(), s, 'pixel metrics'):
        return dict(pixel_auroc=np.nan, pixel_ap=np.nan, pixel_f1max=np.nan, aupro=np.nan)
    order, last, tps, fps = _curves(y.ravel(), s)
    auroc, ap, f1 = _auroc_ap_f1(tps, fps)
    return dict(pixel_auroc=auroc, pixel_ap=ap, pixel_f1max=f1,
                aupro=_aupro(order, last, fps, y, limit))


def aupro(masks, maps, limit=0.3):
    y, s = np.asarray(masks).astype(bool), np.asarray(maps, np.float32).ravel()
    if _degenerate(y.ravel(), s, 'aupro'):
        return np.nan
    order, last, _, fps = _curves(y.ravel(), s)
    return _aupro(order, last, fps, y, limit)


METRICS = ('image_auroc', 'image_ap', 'image_f1max', 'pixel_auroc', 'pixel_ap', 'pixel_f1max', 'aupro')


def compute_metrics(labels, scores, masks=None, maps=None):
    """The seven metrics and mAD (their mean; NaN if any is undefined), as fractions."""
    out = image_metrics(labels, scores)
    if masks is None:
        warnings.warn('no ground-truth masks: the pixel metrics, AUPRO and mAD are NaN')
    out.update(pixel_metrics(masks, maps) if masks is not None else
               dict(pixel_auroc=np.nan, pixel_ap=np.nan, pixel_f1max=np.nan, aupro=np.nan))
    out['mad'] = float(np.mean([out[k] for k in METRICS]))
    return out


def gaussian_blur(x, sigma):
    """Separable Gaussian blur of (B,C,H,W), truncated at 4 sigma, with scipy.ndimage's default
    'reflect' border (the edge pixel repeats: d c b a | a b c d)."""
    if sigma <= 0:
        return x
    r = int(4 * sigma + 0.5)
    k = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype, device=x.device) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).repeat(x.shape[1], 1, 1, 1)
    for dim in (-1, -2):
        n = x.shape[dim]
        idx = torch.arange(-r, n + r, device=x.device)
        idx = torch.where(idx < 0, -idx - 1, torch.where(idx >= n, 2 * n - idx - 1, idx)).remainder(2 * n)
        idx = torch.where(idx >= n, 2 * n - idx - 1, idx)        # fold again for r > n
        x = F.conv2d(x.index_select(dim, idx), k if dim == -1 else k.transpose(2, 3), groups=x.shape[1])
    return x


# -----------------------------------------------------------------------------
# frozen backbones: pretrained weights from a local source only, or BatchNorm-recalibrated random


def load_pretrained(net, name, weights):
    """Load ImageNet weights into a timm backbone from weights='timm' (the local Hugging Face cache
    of timm/<name>; nothing is downloaded) or a file (.safetensors, .pth, .bin). Returns the record
    kept in checkpoints: dict(id, file, sha256)."""
    path = weights
    if weights == 'timm':
        import timm
        from huggingface_hub import try_to_load_from_cache
        try:      # a bare architecture means timm's default weights: resnet50 -> timm/resnet50.a1_in1k
            name = timm.models.get_pretrained_cfg(name).hf_hub_id.split('/', 1)[1]
        except (AttributeError, RuntimeError):    # unknown name or tag: looked up as given
            pass
        found = [try_to_load_from_cache(f'timm/{name}', f) for f in ('model.safetensors', 'pytorch_model.bin')]
        path = next((p for p in found if isinstance(p, str)), None)
        if path is None:
            raise UserError(f"{name} weights are not in the timm cache; on a machine with internet run "
                            f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\" and "
                            "copy ~/.cache/huggingface, or pass --backbone_weights FILE ('' = a random backbone)")
    if not os.path.isfile(path):
        raise UserError(f'backbone weights {path} not found (use a file, timm, or leave it empty)')
    state = read_weights(path)
    own = net.state_dict()
    bad = [k for k in own if not k.endswith('num_batches_tracked') and
           (k not in state or state[k].shape != own[k].shape)]
    if bad:
        raise UserError(f'{path} does not fit {name}: {len(bad)} missing or mis-shaped keys, e.g. {bad[:3]}')
    net.load_state_dict({k: state.get(k, v) for k, v in own.items()})
    return dict(id=name, file=os.path.basename(path), sha256=file_sha256(path))


def read_weights(path):
    """A state dict from a .safetensors file or a torch file (.pth/.bin/.pt, tensors only; a
    {'state_dict': ...} or {'model': ...} wrapper is unpacked)."""
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            return load_file(path)
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:    # truncated, not a weights file, or a pickled module (refused)
        raise UserError(f'cannot read weights from {path} ({type(e).__name__}): give a state dict saved '
                        'with torch.save(model.state_dict()) or a .safetensors file')
    state = state.get('state_dict', state.get('model', state)) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f'{path} holds no state dict of tensors (a {type(state).__name__})')
    return state


def file_sha256(path):
    """sha256 of a file, read in 1 MB chunks (weights files are large)."""
    sha = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            sha.update(chunk)
    return sha.hexdigest()


@torch.no_grad()
def recalibrate_bn(net, batches):
    """Re-estimate the BatchNorm statistics of a random-initialised backbone on normal training
    images (cumulative average). Without it, random EfficientNet-B4 features shrink layer by layer
    (std ~1e-9 at stride 16). Only BatchNorm layers switch to train mode (no stochastic depth).
    The batches must be shuffled samples of the whole training set: the running variance averages
    per-batch variances, so batches of one category each miss the variance between categories
    (features then come out hundreds of times too large)."""
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    net.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum, m.training = None, True
    for x in batches:
        net(x)
    for m, momentum in zip(bns, momenta):   # back to eval mode and the layer's own momentum
        m.momentum, m.training = momentum, False
