"""The ResNet architectures and stems mocohub builds, by name: what a parser lists, without timm or torch."""
__all__ = ["RESNET_ARCHS", "STEMS"]

RESNET_ARCHS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "wide_resnet50_2", "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d",
    # timm's small ResNets (a "deep" 3-conv stem, one block per stage): for CPU demos and studies
    "resnet10t", "test_resnet",
)
STEMS = ("imagenet", "cifar")
