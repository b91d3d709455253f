"""A tiny deterministic feature extractor for tests, registered through torch-fidelity's registry.

Its weights are fixed by a seed: fine for checking that the real evaluation path computes
what it should (FID of a set with itself is 0, a shifted set is far), meaningless as a
quality measure. Real runs use Inception (or a trained extractor).
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import register_feature_extractor

NAME = "tiny-test"


class TinyTestExtractor(FeatureExtractorBase):
    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        generator = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)

    @staticmethod
    def get_provided_features_list():
        return ("128",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        if metric in ("fid", "kid", "prc"):
            return "128"
        raise KeyError(metric)

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, images):
        x = F.interpolate(images.float() / 255.0, size=(32, 32), mode="bilinear", align_corners=False)
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return (F.adaptive_avg_pool2d(x, 2).flatten(1),)


register_feature_extractor(NAME, TinyTestExtractor)
