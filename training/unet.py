"""The nodule localiser's network: a compact U-Net, below both the localiser (which
trains and exports it) and models.py (whose unet backbone is its encoder), so neither
imports the other."""

from __future__ import annotations

import math

import keras
from keras import layers

from training.roi import OUTPUT_NAME


def _conv_block(x, filters: int, name: str):
    for i in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{i}")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn{i}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return x


# The mask head's bias starts at this foreground fraction (nodules cover a few percent
# of a frame), as Lin et al. 2017 (focal loss) start rare classes: the first steps then
# learn where nodules are instead of spending themselves pushing 0.5 down everywhere,
# which left some seeds' short runs stuck near an empty mask.
FOREGROUND_PRIOR = 0.05


def _up(x, skip, filters: int, name: str):
    """One up step: double the resolution, join the skip connection (if any), convolve."""
    x = layers.UpSampling2D(interpolation="bilinear", name=f"{name}_resize")(x)
    if skip is not None:
        x = layers.Concatenate(name=f"{name}_concat")([x, skip])
    return _conv_block(x, filters, name)


def _mask_model(inputs, x, image_size: int) -> keras.Model:
    """The 1x1 sigmoid head (float32 under mixed precision) and the S x S mask output."""
    bias = keras.initializers.Constant(math.log(FOREGROUND_PRIOR / (1 - FOREGROUND_PRIOR)))
    x = layers.Conv2D(
        1, 1, activation="sigmoid", bias_initializer=bias, dtype="float32", name="logits"
    )(x)
    mask = layers.Reshape((image_size, image_size), name=OUTPUT_NAME)(x)
    return keras.Model(inputs, mask, name="localiser")


def build_unet(image_size: int = 128, filters: tuple[int, ...] = (8, 16, 32, 64, 128)):
    """U-Net (Ronneberger et al. 2015), compact: raw 0-255 RGB in, N x S x S probability out.

    Normalization (x / 255) is the first layer, so the exported graph takes the same
    uint8 pixels as the classifier. Levels halve the resolution; `filters` gives each
    level's width (the last is the bottleneck).
    """
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    skips = []
    for level, width in enumerate(filters[:-1]):
        x = _conv_block(x, width, f"down{level}")
        skips.append(x)
        x = layers.MaxPooling2D(name=f"down{level}_pool")(x)
    x = _conv_block(x, filters[-1], "bottleneck")
    for level in reversed(range(len(filters) - 1)):
        x = _up(x, skips[level], filters[level], f"up{level}")
    return _mask_model(inputs, x, image_size)


def build_encoder_unet(encoder: keras.Model, image_size: int, filters: tuple[int, ...]):
    """A U-Net whose down path is a pretrained network (Ronneberger et al.'s up path on,
    say, ImageNet MobileNetV2: training.models.mobilenetv2_layers with MOBILENETV2_TAPS).

    `encoder` maps raw 0..255 RGB (its own normalization inside) to feature maps at
    strides 2, 4, ... 2**K, the last one the bottleneck; it runs in inference mode, so
    its batch-norm statistics stay the pretrained ones. `filters` gives the up path's
    width at strides 1, 2, ... 2**(K-1) (K entries); the last level upsamples to the
    input without a skip.
    """
    inputs = keras.Input((image_size, image_size, 3), name="image")
    *skips, x = encoder(inputs, training=False)
    if len(filters) != len(skips) + 1:
        raise ValueError(
            f"an encoder with {len(skips) + 1} feature maps needs {len(skips) + 1} up-path "
            f"widths, got {len(filters)}"
        )
    for level in reversed(range(len(skips))):
        x = _up(x, skips[level], filters[level + 1], f"up{level + 1}")
    x = _up(x, None, filters[0], "up0")
    return _mask_model(inputs, x, image_size)
