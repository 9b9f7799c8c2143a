"""ResNet-50 classifier whose backbone, with the head dropped, is the 2048-d feature extractor."""
from dataclasses import dataclass

from torch import nn
from torchvision.models import resnet50

from . import EMBEDDING_DIM


@dataclass
class TrainedModel:
    """A model with what embedding needs beside it: its preprocessing, whether embeddings are unit length, and for
    the openvino engine its IR (model.xml or an openvino.Model) and the IR's precision (fp32 or int8)."""
    model: nn.Module
    preprocess: object  # visual_search.preprocessing.PreprocessSettings
    normalize: bool = True
    ir: object = None
    ir_precision: str = None


class ProductNet(nn.Module):
    """`backbone(x)` is the 2048-d embedding; `head` maps it to category logits."""

    def __init__(self, num_categories):
        super().__init__()
        self.backbone = resnet50(weights=None)
        self.backbone.fc = nn.Identity()
        self.head = nn.Linear(EMBEDDING_DIM, num_categories)

    def forward(self, images):
        return self.head(self.backbone(images))

    def embed_and_classify(self, images):
        embeddings = self.backbone(images)
        return embeddings, self.head(embeddings)
