"""Constants that layers above share and that belong to none of them."""

#: The input convention of every ImageNet-pretrained backbone (torchvision's VGG16 and VGG16-BN): RGB in
#: [0, 1], minus this mean, divided by this std, per channel. The released HMoDE code feeds its model the
#: same (``cfg_data.MEAN_STD`` in ``datasets/SHHA/setting.py``).
IMAGENET_NORM = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}

#: The package version (``crowdkernels.__version__``), here so that modules below the package can read it
#: (an exported model records it).
VERSION = "0.1.0"
