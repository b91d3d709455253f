"""Run under `accelerate launch` (2 processes): one generator and one discriminator phase of a tiny VQ-GAN
through the real Trainer, recording what each phase changed and the gradients D's optimizer stepped with.

Usage: vqgan_phase_isolation.py OUT_DIR key=value ...  (config overrides). Writes OUT_DIR/rank{i}.json.
"""

import json
import sys
from pathlib import Path

import torch

from facegen_dist.cluster.teardown import end_without_teardown
from facegen_dist.config import load_config
from facegen_dist.methods import MicroBatch
from facegen_dist.train.loop import Trainer


def snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def main() -> None:
    out = Path(sys.argv[1])
    trainer = Trainer(load_config([], sys.argv[2:]))
    acc, method, modules = trainer.accelerator, trainer.method, trainer.modules
    phases = {phase.name: phase for phase in trainer.phases}
    # different data per rank
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(acc.process_index))
    batch = method.prepare(MicroBatch(trainer.cfg.model.disc_start_images, images=images))  # the discriminator is on

    d_optimizer = trainer.optimizers["discriminator"]
    real_step, record = d_optimizer.step, {}

    def checked_step(*args, **kwargs):
        # The gradients D is about to step with, against those of D's loss alone (recomputed, all-reduced by DDP).
        used = [p.grad.clone() for p in modules["discriminator"].parameters()]
        modules["discriminator"].zero_grad(set_to_none=True)
        loss, _ = method.loss("discriminator", modules, batch)
        acc.backward(loss)
        alone = [p.grad.clone() for p in modules["discriminator"].parameters()]
        record["max_grad_difference"] = max(float((u - a).abs().max()) for u, a in zip(used, alone))
        return real_step(*args, **kwargs)

    d_optimizer.step = checked_step
    before = {name: snapshot(module) for name, module in modules.items()}
    trainer._run_phase(phases["generator"], [batch])
    after_g = {name: snapshot(module) for name, module in modules.items()}
    d_has_grads_after_g = any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in modules["discriminator"].parameters()
    )
    trainer._run_phase(phases["discriminator"], [batch])
    after_d = {name: snapshot(module) for name, module in modules.items()}
    result = {
        "world_size": acc.num_processes,
        "g_step_changed_g": not same(before["vqvae"], after_g["vqvae"]),
        "g_step_changed_d": not same(before["discriminator"], after_g["discriminator"]),
        "d_step_changed_d": not same(after_g["discriminator"], after_d["discriminator"]),
        "d_step_changed_g": not same(after_g["vqvae"], after_d["vqvae"]),
        "g_loss_reached_d": bool(d_has_grads_after_g),
        "checksum": float(sum(p.double().sum() for module in modules.values() for p in module.parameters())),
        **record,
    }
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(result))
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main()
    end_without_teardown(0)  # gloo's threads can abort the interpreter's teardown (facegen_dist.cluster.teardown)
