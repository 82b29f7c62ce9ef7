"""
toy_method.py: a test fixture that follows the method-file contract of DESIGN.md with the smallest
possible model (a two-layer convolutional autoencoder), so the shared machinery (run, training
batches, checkpoints, resume, evaluation) can be tested without any real method.
"""
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

config = dict(common.BASE_CONFIG, steps=6, lr=1e-2, width=8, noise=0.0)
config.update(batch_size=4, image_size=32, log_interval=2, ckpt_interval=3)
PRESETS = {'paper': dict(steps=1000), 'tiny': dict(steps=6)}


class Model(nn.Module):
    INFER_KEYS = ('noise',)

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.net = nn.Sequential(nn.Conv2d(3, cfg['width'], 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(cfg['width'], 3, 3, padding=1))

    def forward(self, x):
        return self.net(x)

    def predict(self, batch):
        x = batch['image']
        if self.cfg['noise']:
            x = x + self.cfg['noise'] * common.sample_noise(x.shape[1:], self.cfg['seed'], batch['path'], x.device)
        recon = self(x)
        amap = (recon - batch['image']).abs().mean(1)
        return dict(map=amap, score=amap.flatten(1).amax(1), recon=recon.clamp(0, 1), nfe={'net': 1})


def train(cfg):
    common.seed_everything(cfg['seed'])
    model = Model(cfg).to(cfg['device'])
    opt = torch.optim.Adam(model.parameters(), lr=cfg['lr'])
    ckpt_path, step, seconds = os.path.join(cfg['out_dir'], 'ckpt.pt'), 0, 0.0
    if cfg['resume']:                 # the checkpoint's config, with the keys given on the command line
        model, ckpt = common.resume(cfg, Model)
        cfg = model.cfg
        opt = torch.optim.Adam(model.parameters(), lr=cfg['lr'])
        common.load_optimizer(opt, ckpt['opt'])
        step, seconds = ckpt['step'], ckpt['train_seconds']
    data = common.load_dataset(cfg, 'train')
    batches = common.train_batches(data, cfg, step, common.perlin_anomaly if cfg.get('perlin') else None)
    t0 = time.time()
    while step < cfg['steps']:
        batch = next(batches)
        x = batch['image'].to(cfg['device'])
        loss = F.mse_loss(model(x), x)
        common.check_finite(loss, step, ckpt_path)
        opt.zero_grad()
        loss.backward()
        common.all_reduce_grads(model.parameters())
        opt.step()
        step += 1
        if step % cfg['ckpt_interval'] == 0 or step == cfg['steps']:
            common.save(ckpt_path, model, opt=opt.state_dict(), step=step, final=step == cfg['steps'],
                        train_seconds=seconds + time.time() - t0)
    return model.eval(), seconds + time.time() - t0


def main(argv=None):
    common.run(common.get_config(config, PRESETS, argv, __file__, __doc__), train, Model)


if __name__ == '__main__':
    common.cli(main)
