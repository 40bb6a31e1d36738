"""The nodule localiser's network: a compact U-Net, below both the localiser (which
trains and exports it) and models.py (whose unet backbone is its encoder), so neither
imports the other."""

from __future__ import annotations

import keras
from keras import layers

from training.roi import OUTPUT_NAME


def _conv_block(x, filters: int, name: str):
    for i in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{i}")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn{i}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return x


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
        x = layers.UpSampling2D(interpolation="bilinear", name=f"up{level}_resize")(x)
        x = layers.Concatenate(name=f"up{level}_concat")([x, skips[level]])
        x = _conv_block(x, filters[level], f"up{level}")
    x = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="logits")(x)
    mask = layers.Reshape((image_size, image_size), name=OUTPUT_NAME)(x)
    return keras.Model(inputs, mask, name="localiser")


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
        x = layers.UpSampling2D(interpolation="bilinear", name=f"up{level + 1}_resize")(x)
        x = layers.Concatenate(name=f"up{level + 1}_concat")([x, skips[level]])
        x = _conv_block(x, filters[level + 1], f"up{level + 1}")
    x = layers.UpSampling2D(interpolation="bilinear", name="up0_resize")(x)
    x = _conv_block(x, filters[0], "up0")
    x = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="logits")(x)
    mask = layers.Reshape((image_size, image_size), name=OUTPUT_NAME)(x)
    return keras.Model(inputs, mask, name="localiser")
