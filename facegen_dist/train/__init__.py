"""Training: the loop, checkpoints, schedules, preemption."""


def run(cfg, preemption=None):
    from facegen_dist.train.loop import run as _run

    return _run(cfg, preemption)
