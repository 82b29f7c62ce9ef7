"""
harness.py: runs one method's train() in a subprocess for the scale-out and failure tests.

  python tests/harness.py METHOD DUMP_DIR [--kill_at N] [--nan_on_rank R] -- [method options]
  torchrun --standalone --nproc_per_node=2 tests/harness.py METHOD DUMP_DIR -- [method options]

Each rank writes DUMP_DIR/rank<r>.pt: its final state_dict and the paths that rank passed to
torch.save (so a test can check that only rank 0 writes). --kill_at N sends the process SIGKILL
at its N-th loss check: a hard kill at a known point between checkpoints, with no cleanup.
--nan_on_rank R makes rank R's loss NaN from step 2 on (the other ranks' stays finite). Errors
for people exit with code 2, as in the method scripts.
"""
import importlib
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


def main():
    args, method_argv = sys.argv[1:sys.argv.index('--')], sys.argv[sys.argv.index('--') + 1:]
    method, dump = args[0], args[1]
    kill_at = int(args[args.index('--kill_at') + 1]) if '--kill_at' in args else None
    nan_rank = int(args[args.index('--nan_on_rank') + 1]) if '--nan_on_rank' in args else None
    module = importlib.import_module(method)
    writes, real_save = [], torch.save

    def recording_save(obj, f, *a, **k):
        writes.append(str(getattr(f, 'name', f)))
        return real_save(obj, f, *a, **k)
    torch.save = recording_save
    real_check, calls = common.check_finite, []

    def check_finite(loss, step, path):
        calls.append(step)
        if kill_at is not None and len(calls) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        nan = nan_rank == common.rank_world()[0] and step >= 2
        return real_check(loss * float('nan') if nan else loss, step, path)
    common.check_finite = check_finite
    cfg = common.get_config(module.config, module.PRESETS, method_argv, module.__file__)
    rank, world = common.dist_setup(cfg)
    try:
        model, _ = module.train(cfg)
        os.makedirs(dump, exist_ok=True)
        real_save(dict(state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                       writes=writes, rank=rank, world=world), os.path.join(dump, f'rank{rank}.pt'))
    finally:
        common.dist_teardown()


if __name__ == '__main__':
    common.cli(main)
