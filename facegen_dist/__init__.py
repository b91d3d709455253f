"""facegen_dist: distributed training of face and avatar generators."""

__version__ = "0.1.0"


def load(path, device="cpu", checkpoint: str = "", ema: bool = True):
    """`facegen_dist.api.load`: a run or export folder as a Model (imported on use: `import facegen_dist` stays light)."""
    from facegen_dist.api import load as load_model

    return load_model(path, device=device, checkpoint=checkpoint, ema=ema)
