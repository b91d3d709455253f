"""Training: the loop, checkpoints, schedules."""


def run(cfg):
    from facegen_dist.train.loop import run as _run

    return _run(cfg)
