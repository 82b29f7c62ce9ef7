"""
eval.py: the one evaluation protocol for all five methods (and the two baselines).

$ python eval.py out/omiad_synthetic_all_tiny_s0/ckpt.pt            # evaluate a checkpoint
$ python eval.py out/<run>/ckpt.pt --heatmaps 16 --S 3              # INFER_KEYS (S: InversionAD, DeCo-Diff)
$ python eval.py --compare out/                                     # one table over all runs
$ python eval.py --predict out/<run>/ckpt.pt image.png [--category NAME] [--S 3]   # one image: score + map
$ python eval.py --bench omiad --preset paper --device cuda [--networks_only]   # params, FLOPs, speed
$ python eval.py --bench metrics                                    # speed of the pixel metrics
$ python eval.py --baselines --data synthetic                       # the mean and zscore baselines

Protocol: maps resized bilinearly to eval_size (no crop), masks nearest (binarised at 0.5); labels from
the folders. Image metrics use the score, pixel metrics every test pixel of a category (normal images
too); AUPRO: MVTec AD's (limit 0.3); mAD: the mean of the seven; times: predict on full batches.
"""
import glob
import hashlib
import json
import os
import re
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import common
from common import METRICS, UserError

NAMES = ('I-AUROC', 'I-AP', 'I-F1', 'P-AUROC', 'P-AP', 'P-F1', 'AUPRO', 'mAD')

# -----------------------------------------------------------------------------
# baselines: per-category statistics of the normal training images, nothing learned


class Baseline(torch.nn.Module):
    """map = channel mean of |x - mean| ('mean') or |x - mean| / (std + 0.02) ('zscore') against the
    normal training images of the sample's category, Gaussian blur sigma 2; score = max."""
    INFER_KEYS = ()

    def __init__(self, cfg, train):
        super().__init__()
        self.cfg, x = cfg, train.images.float() / 255
        self.register_buffer('mean', torch.stack([x[train.cls == c].mean(0) for c in range(len(train.categories))]))
        self.register_buffer('std', torch.stack([x[train.cls == c].std(0) for c in range(len(train.categories))]))

    def predict(self, batch):
        d = (batch['image'] - self.mean[batch['cls']]).abs()
        d = d / (self.std[batch['cls']] + 0.02) if self.cfg['kind'] == 'zscore' else d
        m = common.gaussian_blur(d.mean(1, keepdim=True), 2.0)[:, 0]
        return dict(map=m, score=m.flatten(1).amax(1), nfe={})


_BASELINES = {}


def baselines(cfg):
    """Both baselines on cfg's data and categories at eval_size, one category at a time (cached
    per process, so 'all', 'each' and single categories share the work)."""
    cats = common._categories_of(cfg)          # a trained model's own categories when it recorded them
    keys = {cat: tuple(cfg[k] for k in ('data', 'data_root', 'eval_size', 'seed', 'val_frac')) + (cat,) for cat in cats}
    for cat, key in keys.items():
        if key not in _BASELINES:
            c = dict(cfg, category=cat, image_size=cfg['eval_size'], batch_size=32)
            train, test = common.load_dataset(c, 'train'), common.load_dataset(c, 'test')
            _BASELINES[key] = {kind: evaluate(Baseline(dict(c, kind=kind, method=f'baseline_{kind}', preset='-'),
                                                       train), test, quiet=True) for kind in ('mean', 'zscore')}
    return {kind: merge([_BASELINES[keys[c]][kind] for c in cats], cfg['category']) for kind in ('mean', 'zscore')}


# -----------------------------------------------------------------------------
# evaluation


def _device(model):
    return next(iter(list(model.parameters()) + list(model.buffers()))).device


def _timed(device, fn, *args, **kwargs):
    """(fn(*args, **kwargs), its seconds), with the GPU (CUDA or MPS) synchronised before and after."""
    sync = {'cuda': lambda: torch.cuda.synchronize(device), 'mps': torch.mps.synchronize}.get(device.type, lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    sync()
    return out, time.perf_counter() - t0


@torch.no_grad()
def _infer(model, dataset, batch_size, size, timer):
    """Predict a category; maps resized to size x size. Only image, cls and path reach the model."""
    device, outs = _device(model), dict(score=[], map=[], recon=[], scores={}, path=[])
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        x = dict(image=batch['image'].to(device), cls=batch['cls'].to(device), path=batch['path'])
        if timer['n'] == 0:
            model.predict(x)                      # warm-up (cudnn autotune, lazy init): not timed
        out, seconds = _timed(device, model.predict, x)
        n, amap = len(x['path']), out.get('map')         # the contract (else: wrong metrics, no error)
        if not (torch.is_tensor(amap) and amap.ndim == 3 and len(amap) == n and all(
                torch.is_tensor(v) and v.shape == (n,) for v in [out.get('score'), *out.get('scores', {}).values()])):
            raise UserError(f"{model.cfg['method']}.predict must return tensors map (B,H,W), score (B,) and scores "
                            f"{{name: (B,)}}; for B = {n}: { {k: getattr(v, 'shape', type(v)) for k, v in out.items()} }")
        if n == batch_size or timer['n'] == 0:    # a last, smaller batch is a new shape (MPS: a graph build)
            timer['s'], timer['n'], timer['nfe'] = timer['s'] + seconds, timer['n'] + n, out.get('nfe', {})
        m = F.interpolate(out['map'][:, None].float(), size=(size, size), mode='bilinear', align_corners=False)
        outs['map'].append(m[:, 0].cpu().numpy())
        outs['score'].append(out['score'].cpu().double().numpy())
        if 'recon' in out:
            outs['recon'].append(F.interpolate(out['recon'].float(), size=(size, size), mode='bilinear').cpu().numpy())
        for k, v in out.get('scores', {}).items():
            outs['scores'].setdefault(k, []).append(v.cpu().double().numpy())
        outs['path'] += x['path']
    outs.update({k: np.concatenate(outs[k]) if outs[k] else None for k in ('score', 'map', 'recon')})
    outs['scores'] = {k: np.concatenate(v) for k, v in outs['scores'].items()}
    return outs


def evaluate(model, dataset, out_dir=None, heatmaps=0, train_seconds=float('nan'), quiet=False, train_versions=None):
    """Run the protocol over every category of dataset; print the table (with the baselines) and
    write out_dir/results.json (+ heatmaps/<category>/*.png; train_versions: those a re-evaluated
    checkpoint was trained with). Returns the results dict."""
    cfg, timer, metrics, extra = model.eval().cfg, dict(s=0.0, n=0, nfe={}), {}, {}
    for ci, cat in enumerate(dataset.categories):
        idx = (dataset.cls == ci).nonzero()[:, 0]
        if len(idx) == 0:
            continue
        sub = dataset.subset(idx)
        outs = _infer(model, sub, cfg['batch_size'], cfg['eval_size'], timer)
        outs = model.postprocess(outs) if hasattr(model, 'postprocess') else outs   # e.g. min-max over the test set
        labels, masks = sub.labels.numpy(), sub.masks[:, 0].numpy() if dataset.has_masks[cat] else None
        metrics[cat] = common.compute_metrics(labels, outs['score'], masks, outs['map'])
        extra[cat] = {k: common.image_metrics(labels, v)['image_auroc'] for k, v in outs['scores'].items()}
        if heatmaps and out_dir:
            write_heatmaps(os.path.join(out_dir, 'heatmaps', cat), sub, outs, heatmaps)
    metrics['mean'] = {k: float(np.mean([m[k] for m in metrics.values()])) for k in METRICS + ('mad',)}
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in model.named_children()}
    results = dict(
        method=cfg['method'], data=cfg['data'], category=cfg['category'], preset=cfg['preset'],
        seed=cfg['seed'], config=cfg, protocol=dict(
            eval_size=cfg['eval_size'], resize='bilinear maps, nearest masks, no crop',
            mask_rule=common.MASK_RULE, score_rule=getattr(model, 'SCORE_RULE', 'the model score'),
            timed_device=str(_device(model)), timed_batch_size=cfg['batch_size']),   # for ms_per_image
        versions=dict(common.versions(), **({'trained_with': train_versions} if train_versions else {})),
        metrics=metrics, extra=extra, nfe=timer['nfe'], ms_per_image=1000 * timer['s'] / max(timer['n'], 1),
        train_seconds=train_seconds, params=dict(params, total=sum(p.numel() for p in model.parameters())))
    if out_dir:                                   # before the baselines, which read the training split
        write_json(os.path.join(out_dir, 'results.json'), results)
    if not quiet:
        print_table(results, baselines(cfg))
    return results


def write_json(path, obj):
    common.write_atomic(path, lambda f: json.dump(obj, f, indent=1), 'w')


def merge(results, category):
    """Results of runs over disjoint categories -> one results dict with all rows and their mean."""
    metrics = {c: m for r in results for c, m in r['metrics'].items() if c != 'mean'}
    metrics['mean'] = {k: float(np.mean([m[k] for m in metrics.values()])) for k in METRICS + ('mad',)}
    return dict(results[0], category=category, config=dict(results[0]['config'], category=category), metrics=metrics,
                extra={c: x for r in results for c, x in r['extra'].items()},
                ms_per_image=float(np.mean([r['ms_per_image'] for r in results])),
                train_seconds=float(np.sum([r['train_seconds'] for r in results])))


def summarize_each(out_dir, results, quiet=False):
    """The results.json of a category='each' run: one row per trained model, plus the mean."""
    first, summary = results[0], merge(results, 'each')
    summary['missing'] = [c for c in common.categories(first['data'], first['config']['data_root'])
                          if c not in summary['metrics']]
    write_json(os.path.join(out_dir, 'results.json'), summary)     # before the baselines, as evaluate()
    if not quiet:
        print_table(summary, baselines(dict(first['config'], category='all', categories=[
            c for c in summary['metrics'] if c != 'mean'])))


# -----------------------------------------------------------------------------
# output: tables, heatmaps


def print_table(r, base=None):
    def row(name, m):
        return f"{name[:24]:<24}" + ''.join(f'{100 * m[k]:8.1f}' for k in METRICS + ('mad',))
    print(f"\n{r['method']} | {r['data']} | {r['category']} | preset {r['preset']} | seed {r['seed']}")
    print(f"{'category':<24}" + ''.join(f'{n:>8}' for n in NAMES))
    print('\n'.join([row(cat, m) for cat, m in r['metrics'].items()] +
                    [row(f'baseline {kind} (mean)', b['metrics']['mean']) for kind, b in (base or {}).items()]))
    if r.get('missing'):
        print(f"incomplete: missing {', '.join(r['missing'])}")
    trained = f" | trained {r['train_seconds'] / 60:.1f} min" if r['train_seconds'] == r['train_seconds'] else ''
    print(f"NFE {r['nfe']} | {r['ms_per_image']:.1f} ms/image | {r['params']['total'] / 1e6:.2f} M params{trained}")


def _jet(v):
    """v in [0,1] (H,W) -> (H,W,3) uint8 jet colours."""
    return np.uint8(255 * np.clip(np.stack([1.5 - np.abs(4 * v - c) for c in (3, 2, 1)], -1), 0, 1))


def _panel(image, mask, amap, lo, hi, recon=None):
    """image | ground-truth outline | map overlay | reconstruction; all (H,W,3) uint8."""
    img = np.uint8(255 * np.clip(image, 0, 1))
    outline = img.copy()
    if mask is not None:                          # pixels unlike their upper or left neighbour (0 outside the image)
        m = np.pad(mask, ((1, 0), (1, 0)))
        outline[(mask ^ m[:-1, 1:]) | (mask ^ m[1:, :-1])] = (255, 0, 0)
    overlay = np.uint8(0.5 * img + 0.5 * _jet(np.clip((amap - lo) / max(hi - lo, 1e-12), 0, 1)))
    tiles = [img, outline, overlay] + ([np.uint8(255 * np.clip(recon, 0, 1))] if recon is not None else [])
    return np.concatenate(tiles, 1)


def write_heatmaps(folder, dataset, outs, n):
    """n panels spread over the category, replacing those of an earlier evaluation."""
    os.makedirs(folder, exist_ok=True)
    for stale in glob.glob(os.path.join(glob.escape(folder), '*.png')):
        os.remove(stale)
    lo, hi, size = outs['map'].min(), outs['map'].max(), outs['map'].shape[-1]   # one colour scale per category
    for i in np.unique(np.linspace(0, len(dataset) - 1, n).round().astype(int)):
        image = F.interpolate(dataset[i]['image'][None], size=(size, size), mode='bilinear')[0]
        recon = outs['recon'][i].transpose(1, 2, 0) if outs['recon'] is not None else None
        panel = _panel(image.numpy().transpose(1, 2, 0), dataset.masks[i, 0].numpy() > 0, outs['map'][i], lo, hi, recon)
        name = '_'.join(dataset.paths[i].replace('\\', '/').split('/')[-2:])
        Image.fromarray(panel).save(os.path.join(folder, os.path.splitext(name)[0] + '.png'))

# -----------------------------------------------------------------------------
# command line: checkpoint, --compare, --predict, --bench, --baselines


def _load(path, argv=(), **own):
    """A checkpoint of any method (its file is named in the checkpoint) with argv's inference and run-time keys
    (load() refuses others) and own options (name=default): model, ckpt, typed keys that differ, own values."""
    ckpt = common.read_checkpoint(path)                            # read once: paper checkpoints are GBs
    Model = common.import_method(ckpt['method']).Model            # a copied or new method file too
    typed = common._parse_argv(argv, {**(config := common.saved_config(ckpt, Model)), **own})
    own = {k: typed.pop(k, v) for k, v in own.items()}
    common._check_values(own)                                      # load() checks the typed keys
    model, ckpt = common.load(path, Model, typed, common.pick_device(typed.get('device', 'auto')), ckpt)
    return (model, ckpt, {k: v for k, v in typed.items() if v != config.get(k)}, *own.values())


def evaluate_checkpoint(path, argv):
    model, ckpt, typed, heatmaps, out_dir = _load(path, argv, heatmaps=0, out_dir='')
    path = os.path.join(path, 'ckpt.pt') if os.path.isdir(path) else path      # a run folder: its ckpt.pt
    named = {**({'step': ckpt['step']} if ckpt.get('final') is False else {}), **typed}    # mid-run or overridden:
    tag = re.sub(r'[^\w.,=+-]+', '-', '_'.join(f'{k}{v}' for k, v in named.items()))      # its own folder,
    out_dir = out_dir or os.path.join(os.path.dirname(path) or '.', f'eval_{tag}' if tag else '')   # not the run's
    model.cfg.update(heatmaps=heatmaps, out_dir=out_dir)                       # this evaluation's, in results.json
    return evaluate(model, common.load_dataset(model.cfg, 'test'), out_dir, heatmaps,
                    ckpt.get('train_seconds', float('nan')), train_versions=ckpt.get('versions'))


def compare(root):
    """One table over every results.json under root: mean +- std (ddof 0) over the seeds of each setting:
    method, data, category, preset, protocol and config (not per-run keys; common.MEASURED_KEYS do count); a
    preset with several is labelled by the keys that differ. 'each' members fold into their summary."""
    runs, per_run = {}, common.RESUME_KEYS + common.RUNTIME_KEYS + ('seed', 'cli_keys', 'categories', 'backbone_record',
                                                                     'compile', 'log_interval', 'ckpt_interval')
    for path in sorted(glob.glob(os.path.join(glob.escape(root), '**', 'results.json'), recursive=True)):
        parent = os.path.join(os.path.dirname(os.path.dirname(path)), 'results.json')   # an 'each' run's, or
        up = common.read_results(parent) if os.path.isfile(parent) else {}             # an eval_* folder's run
        if up.get('category') == 'each' and not os.path.relpath(parent, root).startswith('..'):   # a member of a
            continue                                                                  # summary in root: folded in
        r, tag = common.read_results(path), os.path.basename(os.path.dirname(path))
        older = tag.startswith('eval_') and up.get('train_seconds', 0) > r['train_seconds']     # NaN: never
        preset = r['preset'] + (f' {tag}' if tag.startswith('eval_') else '') + (   # a re-evaluation, perhaps of a
            ' of an earlier checkpoint' if older else '')             # checkpoint --resume has trained further since
        cfg = {k: v for k, v in r['config'].items() if k not in per_run or k in common.MEASURED_KEYS}
        setting = json.dumps(dict(cfg, mask_rule=r['protocol']['mask_rule']), sort_keys=True)   # eval_size: in cfg
        runs.setdefault((r['method'], r['data'], r['category'], preset, setting), []).append(r)
    if not runs:
        raise UserError(f'no results.json under {root}')
    rows, lines = {}, [('method / data / category / preset', f"{'seeds':>6}" + ''.join(f'{n:>13}' for n in NAMES)
                        + f"{'ms/img':>9}{'params M':>10}{'train min':>10}  NFE")]
    for (method, data, cat, preset, setting), rs in sorted(runs.items()):
        others = [json.loads(k[4]) for k in runs if k[:4] == (method, data, cat, preset) and k[4] != setting]
        mine = json.loads(setting)          # other settings of this preset: label by the keys that differ
        diff = [f"{k}={mine.get(k, '<absent>')}" for k in sorted(set(mine).union(*others))   # <absent>: a key
                if any(o.get(k) != mine.get(k) for o in others)]                        # added since
        preset += (' ' + (' '.join(diff) or hashlib.sha1(setting.encode()).hexdigest()[:6])) if others else ''
        rows[method, data, cat, preset] = rs
        m = np.array([[r['metrics']['mean'][k] for k in METRICS + ('mad',)] for r in rs]) * 100
        cells = ''.join(f'{a:7.1f}+-{s:<4.1f}' for a, s in zip(m.mean(0), m.std(0)))
        seeds, cpus = len({r['seed'] for r in rs}), len({r['versions'].get('cpu') for r in rs})   # see versions()
        flag = (' INCOMPLETE' if any(r.get('missing') for r in rs) else '') + (
            f' ({len(rs)} runs of {seeds} seeds)' if seeds < len(rs) else '') + (f' ({cpus} CPUs)' if cpus > 1 else '')
        lines.append((f'{method} / {data} / {cat} / {preset}', f'{seeds:>6}{cells}'
                      f"{np.mean([r['ms_per_image'] for r in rs]):9.1f}{rs[0]['params']['total'] / 1e6:10.2f}"
                      f"{np.mean([r['train_seconds'] for r in rs]) / 60:10.1f}  {rs[0]['nfe']}{flag}"))
    width = max([40] + [len(label) + 2 for label, _ in lines])     # long labels (a preset's keys) stay aligned
    print('\n'.join(f'{label:<{width}}{rest}' for label, rest in lines))
    return rows


@torch.no_grad()
def predict(ckpt, image_path, out='', argv=()):
    """Score one image with a trained model; writes image | map overlay to out (.png). argv: inference keys,
    --device, --category (the image's, for a class-conditioned DeCo-Diff trained on several)."""
    model, _, _, category = _load(ckpt, argv, category='')
    cats = list(model.cfg.get('categories') or common._categories_of(model.cfg))   # as trained; no data needed
    if (category or len(cats) > 1 and model.cfg.get('class_cond')) and category not in cats:
        raise UserError(f"name the image's category with --category: one of {', '.join(cats)}"
                        + (f' (not {category!r})' if category else ''))
    cls = torch.tensor([cats.index(category) if category else 0], device=_device(model))
    x = torch.tensor(common._read(image_path, model.cfg['image_size'])).float()[None] / 255
    key = common.path_key(image_path, model.cfg['data_root'])         # as evaluation's: its noise, and its name
    o = model.predict(dict(image=x.to(_device(model)), cls=cls, path=[key]))
    amap = o['map'][0].float().cpu().numpy()
    name = key if '/' in key else '/'.join(os.path.splitdrive(os.path.abspath(image_path))[1].split(os.sep)[-2:])
    out = out or os.path.join(ckpt if os.path.isdir(ckpt) else os.path.dirname(ckpt), 'predict',   # in the run's
                              os.path.splitext(name)[0].replace('/', '_') + '_heatmap.png')        # folder, not here
    panel = _panel(F.interpolate(x, size=amap.shape)[0].numpy().transpose(1, 2, 0), None, amap, amap.min(), amap.max())
    common.write_atomic(out, lambda f: Image.fromarray(panel).save(f, 'PNG'))
    if not np.isfinite(score := float(o['score'][0])):   # e.g. InversionAD saved before its validation statistics
        raise UserError(f'{ckpt} scores this image {score}: saved mid-run or without the statistics it needs, or a bug')
    print(f'{image_path}: score {score:.6g} ({model.cfg["method"]}; higher = more anomalous); '
          f'heatmap (colours scaled to this image) -> {out}')
    return score, amap


@torch.no_grad()
def bench(method, argv):
    """Cost of a method at any preset with random weights: parameters per network; every network
    pass of a batch-1 predict with its call count, FLOPs and one measured forward (so a paper-scale
    model is costed without running its NFE loop); then, unless --networks_only, ms/image of the
    full predict at batch 1 and 32 and the share spent outside network passes (pipeline overhead)."""
    from torch.utils.flop_counter import FlopCounterMode
    networks_only, module = '--networks_only' in argv, common.import_method(method)
    cfg = common.get_config(module.config, module.PRESETS, [a for a in argv if a != '--networks_only'], module.__file__)
    model, device = module.Model(cfg).to(cfg['device']).eval(), torch.device(cfg['device'])
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in model.named_children()}
    print(f"{method} ({cfg['preset']}): " + ', '.join(f'{n} {p / 1e6:.1f} M' for n, p in params.items()))
    def batch(b):
        return dict(image=torch.rand(b, 3, cfg['image_size'], cfg['image_size'], device=device),
                    cls=torch.zeros(b, dtype=torch.long, device=device), path=[f'bench/{i}' for i in range(b)])
    with FlopCounterMode(display=False) as counter:
        _, _, passes, nfe = _network_passes(model, batch(1), device, reuse=True)
    flops, nets = counter.get_total_flops(), []          # the shortened predict ran each pass once
    print(f'network passes of a batch-1 predict (random weights, {device}):')
    for (name, _), (calls, forward, args, kwargs) in passes.items():
        with FlopCounterMode(display=False) as one:
            forward(*args, **kwargs)
        seconds = []                        # one forward; a fast one is repeated (median) for a stable ms
        while not seconds or (len(seconds) < 10 and sum(seconds) < 0.2):
            seconds.append(_timed(device, forward, *args, **kwargs)[1])
        flops += (calls - 1) * one.get_total_flops()
        nets.append(dict(name=name, input=next((list(a.shape) for a in args if torch.is_tensor(a)), []), calls=calls,
                         flops=one.get_total_flops(), ms=1000 * np.median(seconds)))
        print(f"  {name:<24}{str(nets[-1]['input']):<20}{calls:>5} x {nets[-1]['flops'] / 1e9:9.3f} GFLOPs, "
              f"{nets[-1]['ms']:9.1f} ms")
    print(f"{flops / 1e9:.1f} GFLOPs/image | NFE {nfe} | network passes "
          f"{sum(n['calls'] * n['ms'] for n in nets):.1f} ms/image at batch 1")
    ms = {}
    for b in () if networks_only else (1, 32):
        _network_passes(model, batch(b), device, reuse=False)           # warm-up
        total, net, _, _ = _network_passes(model, batch(b), device, reuse=False)
        ms[b] = (1000 * total / b, 1000 * net / b)
        print(f'batch {b}: {ms[b][0]:.1f} ms/image on {device}, of which network passes {ms[b][1]:.1f} ms '
              f'(pipeline overhead {100 * (1 - net / total):.0f}%)')
    return dict(params=params, flops=flops, nfe=nfe, networks=nets, ms=ms)


def _network_passes(model, x, device, reuse):
    """predict(x) with every outermost module call below the model (each network pass) timed and
    counted per (network, input shapes); reuse=True runs only the first call of each (numbers such
    as timesteps are not in the key, so an NFE loop costs one pass) and returns copies afterwards.
    Returns seconds of predict, seconds in network passes, {key: [calls, forward, args, kwargs]}, NFE."""
    from torch.utils._pytree import tree_map
    names = {m: n for n, m in model.named_modules() if m is not model}
    depth, spent, passes, first_out = [0], [0.0], {}, {}

    def signature(v):
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        return (tuple(v.shape), v.dtype) if torch.is_tensor(v) else type(v).__name__ if number else repr(v)

    def wrap(module, forward):
        def counted(*args, **kwargs):
            if depth[0]:                                      # inside another network: part of its pass
                return forward(*args, **kwargs)
            key = (names[module], str(tree_map(signature, (args, kwargs))))
            passes.setdefault(key, [0, forward, args, kwargs])[0] += 1
            if reuse and key in first_out:
                return tree_map(lambda v: v.clone() if torch.is_tensor(v) else v, first_out[key])
            depth[0] += 1
            try:
                out, seconds = _timed(device, forward, *args, **kwargs)
            finally:
                depth[0] -= 1
            spent[0], first_out[key] = spent[0] + seconds, out
            return out
        return counted
    patched = [m for m in names if 'forward' not in vars(m)]
    for m in patched:
        m.forward = wrap(m, m.forward)
    try:
        out, total = _timed(device, model.predict, x)
    finally:
        for m in patched:
            del m.forward
    return total, spent[0], passes, out.get('nfe', {})


def bench_metrics(n=100, size=256):
    """Seconds for the four pixel metrics (one shared sort) and for AUPRO alone on n random maps."""
    masks = np.zeros((n, size, size), bool)
    masks[: n // 2, size // 3: size // 2, size // 4: size // 2] = True
    maps = (np.random.default_rng(0).random((n, size, size)) + 0.5 * masks).astype(np.float32)
    both, alone = (_timed(torch.device('cpu'), f, masks, maps)[1] for f in (common.pixel_metrics, common.aupro))
    print(f'{n} maps of {size}x{size}: pixel AUROC+AP+F1+AUPRO {both:.2f} s, AUPRO alone {alone:.2f} s')
    return both, alone


def run_baselines(argv):
    defaults = {k: common.BASE_CONFIG[k] for k in ('data', 'data_root', 'category', 'seed', 'eval_size', 'val_frac')}
    cfg = common.data_defaults({**defaults, **common._parse_argv(argv, defaults)})
    for kind, r in (results := baselines(cfg)).items():
        print_table(r)
        write_json(f"out/baseline_{kind}_{cfg['data']}_{cfg['category']}_s{cfg['seed']}/results.json", r)
    return results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(__doc__)
    elif argv[0] == '--compare':
        if len(argv) > 2:
            raise UserError(f'--compare takes one folder (got {len(argv) - 1}): put the runs under one, e.g. out/')
        return compare(argv[1] if len(argv) > 1 else 'out')
    elif argv[0] == '--predict':
        n = next((j for j, a in enumerate(argv) if j and a.startswith('--')), len(argv))   # CKPT IMAGE [OUT], then
        rest = argv[1:n]                                                                    # options
        if not 2 <= len(rest) <= 3 or len(rest) == 3 and os.path.exists(rest[2]) and not rest[2].endswith(
                '_heatmap.png'):                                          # a second image is not overwritten
            raise UserError('usage: python eval.py --predict CKPT IMAGE [NEW.png] [--category NAME] [inference keys]')
        return predict(*rest, argv=argv[n:])
    elif argv[0] == '--bench':
        if len(argv) < 2:
            raise UserError(f"usage: python eval.py --bench METHOD [--preset paper]; methods: {', '.join(common.METHODS)}")
        return bench_metrics() if argv[1] == 'metrics' else bench(argv[1], argv[2:])
    elif argv[0] == '--baselines':
        return run_baselines(argv[1:])
    elif argv[0].startswith('--'):                 # not a checkpoint path: a mistyped command
        raise UserError(f'unknown command {argv[0]}: give a checkpoint, --compare, --predict, --bench or --baselines')
    return evaluate_checkpoint(argv[0], argv[1:])


if __name__ == '__main__':
    common.cli(main)
