"""Registry of training methods, keyed by `model.name`."""

from facegen_dist.methods.autoencoder import AutoencoderMethod
from facegen_dist.methods.base import Method, MicroBatch, Phase
from facegen_dist.methods.dcgan import DCGANMethod
from facegen_dist.methods.introvae import IntroVAEMethod
from facegen_dist.methods.prior import GPTPriorMethod, PixelCNNPriorMethod
from facegen_dist.methods.vqgan import VQGANMethod
from facegen_dist.methods.vqvae import VQVAEMethod

METHODS: dict[str, type[Method]] = {
    "ae": AutoencoderMethod,
    "vae": AutoencoderMethod,
    "vqvae": VQVAEMethod,
    "vqvae2": VQVAEMethod,
    "vqgan": VQGANMethod,
    "pixelcnn_prior": PixelCNNPriorMethod,
    "gpt_prior": GPTPriorMethod,
    "dcgan": DCGANMethod,
    "introvae": IntroVAEMethod,
}


def build_method(model_cfg, resolution: int) -> Method:
    """The registry's method, constructed only: facegen_dist.runs.build_method also hands in its upstream run (a prior's)."""
    return METHODS[model_cfg.name](model_cfg, resolution)


__all__ = ["METHODS", "Method", "MicroBatch", "Phase", "build_method"]
