"""Backbones, the class-activation head, and the fine-tuning strategies of the thesis.

Every model takes raw 0-255 RGB pixels (float32, N x S x S x 3): the backbone's own
normalization is the first layer, so the exported graph needs no preprocessing
outside it. The head is GlobalAveragePooling -> Dropout -> Dense in one layer that
also returns the class activation maps, which for this head equal Grad-CAM up to a
positive factor, so heatmaps come out of the same forward pass.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import keras
import numpy as np
from keras import layers, ops

from thyroid_cad import tirads
from training import weights as weight_files
from training.choices import BACKBONES, STRATEGIES

log = logging.getLogger(__name__)


# Block names of each backbone, input to output; a layer belongs to the block its
# name starts with. Partial fine-tuning unfreezes the last N of these.
BLOCKS = {
    "tiny": ("block1", "block2", "block3", "block4"),
    "unet": ("down0", "down1", "down2", "down3", "bottleneck"),
    "vgg16": ("block1", "block2", "block3", "block4", "block5"),
    "vgg19": ("block1", "block2", "block3", "block4", "block5"),
    "resnet50": ("conv1", "conv2", "conv3", "conv4", "conv5"),
    "efficientnetb0": (
        "stem",
        "block1",
        "block2",
        "block3",
        "block4",
        "block5",
        "block6",
        "block7",
        "top",
    ),
    # The stem, the 17 inverted-residual blocks, the 1280-channel top convolution.
    "mobilenetv2": ("Conv1", "expanded_conv", *(f"block_{i}" for i in range(1, 17)), "Conv_1"),
    "squeezenet": ("conv1", *(f"fire{i}" for i in range(2, 10))),
}
_KERAS_APPS = {
    "vgg16": keras.applications.VGG16,
    "vgg19": keras.applications.VGG19,
    "resnet50": keras.applications.ResNet50,
    "efficientnetb0": keras.applications.EfficientNetB0,
    "mobilenetv2": keras.applications.MobileNetV2,
}
# Backbones whose weights files this project imports itself (training.weights) rather
# than through Keras: ImageNet TFLite models, and the Keras 1 SqueezeNet file.
_IMPORTED = ("mobilenetv2", "squeezenet")
# The input size of the ImageNet TFLite files (their parity is checked there).
TFLITE_SIZE = 224
# Mean BGR pixel of ImageNet, subtracted by VGG and ResNet ("caffe" preprocessing).
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="thyroid_cad")
class CaffePreprocess(layers.Layer):
    """RGB 0-255 -> BGR minus the ImageNet mean, as VGG and ResNet50 expect."""

    def call(self, x):
        x = ops.flip(ops.cast(x, self.compute_dtype), axis=-1)
        return x - ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype=self.compute_dtype)


@keras.saving.register_keras_serializable(package="thyroid_cad")
class CamHead(layers.Layer):
    """GAP -> Dropout -> Dense -> softmax(logits / T), plus class activation maps.

    Returns (probabilities N x K, cam N x h x w x K) where cam[..., k] is
    sum_c features[..., c] * kernel[c, k]. For this head the gradient of logit k with
    respect to the feature map is kernel[:, k] / (h * w) everywhere, so Grad-CAM's
    map, ReLU(sum_c alpha_c^k A^c), equals ReLU(cam[..., k]) / (h * w): exact,
    gradient-free, computed in the forward pass. T is a temperature fitted on
    validation data after training (1 until then) so the probabilities are calibrated.
    """

    def __init__(self, num_classes: int, dropout: float = 0.3, **kwargs):
        kwargs.setdefault("dtype", "float32")  # full precision even under mixed_float16
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.dropout_rate = dropout
        self.dropout = layers.Dropout(dropout)

    def build(self, input_shape):
        channels = input_shape[-1]
        self.kernel = self.add_weight(
            name="kernel", shape=(channels, self.num_classes), initializer="glorot_uniform"
        )
        self.bias = self.add_weight(name="bias", shape=(self.num_classes,), initializer="zeros")
        self.temperature = self.add_weight(
            name="temperature", shape=(), initializer="ones", trainable=False
        )

    def call(self, features, training=None):
        features = ops.cast(features, "float32")
        pooled = self.dropout(ops.mean(features, axis=(1, 2)), training=training)
        logits = ops.matmul(pooled, self.kernel) + self.bias
        probabilities = ops.softmax(logits / self.temperature, axis=-1)
        cam = ops.einsum("bhwc,ck->bhwk", features, self.kernel)
        return probabilities, cam

    def compute_output_shape(self, input_shape):
        n, h, w, _ = input_shape
        return (n, self.num_classes), (n, h, w, self.num_classes)

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "dropout": self.dropout_rate,
        }


def tiny_backbone(image_size: int) -> keras.Model:
    """A four-block CNN for tests and quick demos (about 100k parameters)."""
    inputs = keras.Input((image_size, image_size, 3))
    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    for i, filters in enumerate((16, 32, 64, 96), start=1):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"block{i}_conv")(x)
        # momentum 0.8: moving statistics settle within the few hundred steps of a small run
        x = layers.BatchNormalization(momentum=0.8, name=f"block{i}_bn")(x)
        x = layers.Activation("relu", name=f"block{i}_relu")(x)
        if i < 4:
            x = layers.MaxPooling2D(name=f"block{i}_pool")(x)
    return keras.Model(inputs, x, name="backbone")


# The localiser's encoder, pooled: its first bottleneck convolution (after BN and ReLU).
UNET_FEATURES = "bottleneck_relu1"
UNET_WEIGHTS_FILE = "localiser.keras"


def unet_backbone(image_size: int, weights: str | None) -> keras.Model:
    """The nodule localiser's U-Net encoder (training.unet.build_unet, down to the
    bottleneck), from scratch or with a trained localiser's weights.

    A localiser learns from dense outlines of about a thousand thyroid nodules and
    breast lesions, far more supervision than ~500 benign/malignant labels; its encoder
    is the one backbone here that has seen what a nodule looks like (docs/results.md).
    Being fully convolutional, it takes any input size.
    """
    from training.unet import build_unet  # here: importing models needn't load roi and MLflow

    if weights is None:
        unet = build_unet(image_size)
    else:
        if weights == "imagenet":
            raise ValueError("the unet backbone has no ImageNet weights; pass a localiser")
        trained = keras.saving.load_model(weights, compile=False)
        if any(layer.name == "encoder" for layer in trained.layers):
            raise ValueError(
                f"{weights} is a localiser on a pretrained MobileNetV2: train the classifier "
                "with --backbone mobilenetv2 and that network's ImageNet weights"
            )
        try:  # the trained localiser's own widths, level by level
            levels = sorted(
                (int(layer.name[4:-6]), layer.filters)
                for layer in trained.layers
                if layer.name.startswith("down") and layer.name.endswith("_conv1")
            )
            widths = (*(f for _, f in levels), trained.get_layer("bottleneck_conv1").filters)
            unet = build_unet(image_size, widths)
            for layer in unet.layers:
                if layer.weights and not layer.name.startswith("up"):
                    layer.set_weights(trained.get_layer(layer.name).get_weights())
        except ValueError as e:
            raise ValueError(f"{weights} is not a nodule localiser's Keras model: {e}") from e
    return keras.Model(unet.input, unet.get_layer(UNET_FEATURES).output, name="backbone")


# MobileNetV2 feature maps a U-Net's up path joins, at strides 2, 4, 8, 16 and 32: the
# expansion ReLUs before each strided block, and the last block (the segmentation
# convention of Sandler et al. 2018 and TensorFlow's pix2pix example).
MOBILENETV2_TAPS = (
    "block_1_expand_relu",
    "block_3_expand_relu",
    "block_6_expand_relu",
    "block_13_expand_relu",
    "block_16_project",
)


def mobilenetv2_layers(image_size: int, weights: str | None, names: tuple[str, ...]) -> keras.Model:
    """The mobilenetv2 backbone (weights imported as for training) with the outputs of
    its layers `names`: raw 0..255 RGB in, one feature map per name out."""
    backbone = build_backbone("mobilenetv2", image_size, weights)
    app = next(layer for layer in backbone.layers if isinstance(layer, keras.Model))
    inputs = keras.Input((image_size, image_size, 3))
    x = backbone.get_layer("mobilenet_preprocess")(inputs)
    outs = keras.Model(app.input, [app.get_layer(n).output for n in names], name=app.name)(x)
    return keras.Model(inputs, outs, name="encoder")


def resolve_weights(weights: str | None) -> str | None:
    """'imagenet', 'none' or a local weights file -> what keras.applications takes.

    A folder holding a localiser's Keras file (`thyroid-cad localiser export`) stands
    for that file (the unet backbone's weights).
    """
    if weights in (None, "", "none"):
        return None
    if weights == "imagenet":
        return "imagenet"
    path = Path(weights).expanduser()
    if path.is_dir() and (path / UNET_WEIGHTS_FILE).is_file():
        path = path / UNET_WEIGHTS_FILE
    if not path.is_file():
        raise ValueError(f"weights must be 'imagenet', 'none' or an existing file; got {weights!r}")
    return str(path)


def squeezenet_backbone(image_size: int) -> keras.Model:
    """SqueezeNet v1.1 (Iandola et al. 2016) without its classifier, in Keras layers,
    named so that the Keras 1 ImageNet file (training.weights.squeezenet_h5) fits it:
    conv1 (3x3/2, 64) -> pool -> fire2, fire3 -> pool -> fire4, fire5 -> pool ->
    fire6 ... fire9 (512 channels). A fire module squeezes with 1x1 convolutions, then
    expands with 1x1 and 3x3 ones side by side. Caffe preprocessing, as it was trained.
    """
    inputs = keras.Input((image_size, image_size, 3))
    x = CaffePreprocess(name="caffe_preprocess")(inputs)
    x = layers.Conv2D(64, 3, strides=2, activation="relu", name="conv1")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool1")(x)
    widths = {2: (16, 64), 3: (16, 64), 4: (32, 128), 5: (32, 128)}
    widths |= {6: (48, 192), 7: (48, 192), 8: (64, 256), 9: (64, 256)}
    for i, (squeeze, expand) in widths.items():
        name = f"fire{i}"
        s = layers.Conv2D(squeeze, 1, activation="relu", name=f"{name}_squeeze1x1")(x)
        e1 = layers.Conv2D(expand, 1, activation="relu", name=f"{name}_expand1x1")(s)
        e3 = layers.Conv2D(expand, 3, padding="same", activation="relu", name=f"{name}_expand3x3")(
            s
        )
        x = layers.Concatenate(name=f"{name}_concat")([e1, e3])
        if i in (3, 5):
            x = layers.MaxPooling2D(3, strides=2, name=f"pool{i}")(x)
    return keras.Model(inputs, x, name="backbone")


def _imported_base(backbone: str, image_size: int, weights: str | None) -> keras.Model:
    """MobileNetV2 or SqueezeNet, its weights imported by training.weights where given
    as a file (a TFLite model, Keras' own .h5 / .weights.h5, the Keras 1 SqueezeNet
    file); 'imagenet' takes Keras' own download for MobileNetV2."""
    if backbone == "squeezenet":
        if weights == "imagenet":
            raise ValueError(
                "Keras has no SqueezeNet download; pass --weights PATH to the SqueezeNet "
                "v1.1 ImageNet file (squeezenet_weights_tf_dim_ordering_tf_kernels_notop.h5)"
            )
        model = squeezenet_backbone(image_size)
        if weights is not None:
            weight_files.load(model, weights)
        return model
    file = weights if weights not in (None, "imagenet") else None
    base = _keras_app(backbone, image_size, None if file else weights)
    if file:
        weight_files.load(base, file)
    inputs = keras.Input((image_size, image_size, 3))
    # MobileNet's convention: pixels 0..255 -> -1..1 (keras' mobilenet_v2.preprocess_input).
    x = layers.Rescaling(1 / 127.5, offset=-1, name="mobilenet_preprocess")(inputs)
    return keras.Model(inputs, base(x), name="backbone")


def _keras_app(backbone: str, image_size: int, weights: str | None) -> keras.Model:
    """A keras.applications base without its top, with a clear message when offline."""
    try:
        return _KERAS_APPS[backbone](
            include_top=False, weights=weights, input_shape=(image_size, image_size, 3)
        )
    except Exception as e:  # keras raises bare Exception / URL errors when offline
        if weights == "imagenet":
            home = os.environ.get("KERAS_HOME", "~/.keras")
            raise ValueError(
                f"ImageNet weights for {backbone} are not in the Keras cache ({home}/models) "
                f"and cannot be downloaded here ({type(e).__name__}: {e}). Copy the *_notop.h5 "
                "file there, or pass --weights PATH to a local weights file."
            ) from e
        raise


def build_backbone(backbone: str, image_size: int, weights: str | None) -> keras.Model:
    """The convolutional base, named 'backbone', with its normalization built in."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {BACKBONES}")
    if image_size < 32:
        raise ValueError(f"image size must be at least 32 pixels, got {image_size}")
    weights = resolve_weights(weights)
    if backbone == "tiny":
        if weights is not None:
            raise ValueError("the tiny backbone has no pretrained weights; use --weights none")
        return tiny_backbone(image_size)
    if backbone == "unet":
        return unet_backbone(image_size, weights)
    if backbone in _IMPORTED:
        return _imported_base(backbone, image_size, weights)
    if weights not in (None, "imagenet") and weight_files.is_tflite(weights):
        raise ValueError(f"TFLite weights import into mobilenetv2 only, not {backbone}")
    base = _keras_app(backbone, image_size, weights)
    inputs = keras.Input((image_size, image_size, 3))
    x = inputs if backbone == "efficientnetb0" else CaffePreprocess(name="caffe_preprocess")(inputs)
    return keras.Model(inputs, base(x), name="backbone")


def import_parity(backbone: str, weights: str, images) -> dict[str, float]:
    """How closely the imported backbone reproduces a TFLite weights file, on `images`
    (uint8, any size; resized to the file's 224 px): its pooled features against the
    interpreter's, worst image (cosine similarity, relative L2 error). {} for other files.
    """
    weights = resolve_weights(weights)
    if weights is None or weights == "imagenet" or not weight_files.is_tflite(weights):
        return {}
    import tensorflow as tf

    batch = tf.image.resize(np.asarray(images), (TFLITE_SIZE, TFLITE_SIZE), antialias=True)
    batch = np.clip(np.round(batch.numpy()), 0, 255).astype("uint8")
    base = build_backbone(backbone, TFLITE_SIZE, weights)
    ours = ops.convert_to_numpy(ops.mean(base(batch.astype("float32")), axis=(1, 2)))
    theirs = weight_files.tflite_outputs(weights, batch)["pooled"]
    figures = weight_files.agreement(ours, theirs)
    return {f"weights_parity_pooled_{k}": v for k, v in figures.items()} | {
        "weights_parity_images": len(batch)
    }


def build_model(
    backbone: str,
    num_classes: int,
    image_size: int,
    weights: str | None = None,
    dropout: float = 0.3,
    bn_frozen: bool | None = None,
    descriptors: dict[str, int] | None = None,
) -> keras.Model:
    """Backbone + CamHead; the model's output is the probabilities.

    With `descriptors` ({name: number of categories}, training.descriptors), the model
    also has one softmax head per TI-RADS descriptor on the pooled features, and its
    output is a dict: {'probabilities', 'descriptor_<name>', ...}.

    BatchNormalization runs in inference mode whenever the backbone starts from
    learned weights (their statistics are worth keeping, and small batches would wreck
    them); from scratch it trains as usual. `bn_frozen` overrides the choice (a backbone
    about to receive a previous run's weights counts as pretrained).
    """
    if num_classes < 2:
        raise ValueError(f"need at least two classes, got {num_classes}")
    base = build_backbone(backbone, image_size, weights)
    if bn_frozen is None:
        bn_frozen = resolve_weights(weights) is not None
    inputs = keras.Input((image_size, image_size, 3), name="image")
    features = base(inputs, training=False) if bn_frozen else base(inputs)
    probabilities, _ = CamHead(num_classes, dropout, name="cam_head")(features)
    if descriptors:
        pooled = layers.GlobalAveragePooling2D(name="descriptor_pool", dtype="float32")(features)
        pooled = layers.Dropout(dropout, name="descriptor_dropout")(pooled)
        heads = {
            tirads.output_name(name): layers.Dense(
                n, activation="softmax", dtype="float32", name=tirads.output_name(name)
            )(pooled)
            for name, n in descriptors.items()
        }
        return keras.Model(
            inputs, {"probabilities": probabilities, **heads}, name=f"thyroid_{backbone}"
        )
    return keras.Model(inputs, probabilities, name=f"thyroid_{backbone}")


def descriptor_outputs(model: keras.Model) -> dict:
    """{'descriptor_<name>': output tensor} of a model's descriptor heads ({} if none)."""
    return {
        layer.name: layer.output
        for layer in model.layers
        if isinstance(layer, layers.Dense) and layer.name.startswith(tirads.OUTPUT_PREFIX)
    }


def with_heatmaps(model: keras.Model) -> keras.Model:
    """The same weights, returning {'probabilities', 'cam'} (and the descriptor heads'
    'descriptor_<name>' where the model has them): what gets exported."""
    head = model.get_layer("cam_head")
    probabilities, cam = head.output
    return keras.Model(
        model.inputs,
        {"probabilities": probabilities, "cam": cam, **descriptor_outputs(model)},
    )


def fold_linear_probe(model: keras.Model, probe) -> None:
    """Write a fitted StandardScaler -> LogisticRegression on the pooled features (the
    feature_extractor's output) into the model's CamHead, temperature 1.

    The head computes softmax(pooled @ kernel + bias); with kernel = (coef / scale).T and
    bias = intercept - coef @ (mean / scale) it gives the probe's probabilities (binary:
    sigmoid(z) = softmax([0, z])), and the head's class activation map is then the exact
    Grad-CAM of the probe's logit.
    """
    scaler, logreg = probe.steps[0][1], probe.steps[-1][1]
    head = model.get_layer("cam_head")
    k = head.num_classes
    if list(logreg.classes_) != list(range(k)):
        raise ValueError(f"the probe saw classes {list(logreg.classes_)}, the head has {k}")
    coef = logreg.coef_ / scaler.scale_
    intercept = logreg.intercept_ - coef @ scaler.mean_
    if k == 2:
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.concatenate([[0.0], intercept])
    head.kernel.assign(coef.T.astype("float32"))
    head.bias.assign(intercept.astype("float32"))
    head.temperature.assign(1.0)


def feature_extractor(model: keras.Model) -> keras.Model:
    """Pooled deep features (N x C), the input of SVM and Random Forest classifiers."""
    features = model.get_layer("cam_head").input
    pooled = layers.GlobalAveragePooling2D(name="pooled_features")(features)
    return keras.Model(model.inputs, pooled, name="feature_extractor")


def block_of(backbone: str, layer_name: str) -> str | None:
    """The block a layer belongs to, or None (normalization, padding, input layers)."""
    layer_name = layer_name.removeprefix("bn_")  # MobileNetV2's stem batch norm: bn_Conv1
    for block in BLOCKS[backbone]:
        rest = layer_name[len(block) :]
        if layer_name.startswith(block) and (
            rest == "" or rest[0] == "_" or (block.startswith("block") and rest[0].isalpha())
        ):  # 'block5_conv1' (VGG), 'conv5_block3_out' (ResNet), 'block6a_expand' (EfficientNet)
            return block
    return None


def _leaf_layers(model: keras.Model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):  # a keras.applications base inside our wrapper
            yield from _leaf_layers(layer)
        else:
            yield layer


def set_trainable(model: keras.Model, backbone: str, strategy: str, blocks: int = 1) -> list[str]:
    """Freeze or unfreeze the backbone for a strategy; the head always trains.

    Args:
        strategy: 'frozen' (feature extraction), 'partial' (last `blocks` blocks) or
            'full'. 'two-phase' is 'frozen' then 'partial', run by the trainer.
        blocks: how many blocks, counted from the top, 'partial' unfreezes.

    Returns:
        The names of the blocks left trainable.
    """
    names = BLOCKS[backbone]
    if strategy == "frozen":
        open_blocks: tuple[str, ...] = ()
    elif strategy == "partial":
        if not 1 <= blocks <= len(names):
            raise ValueError(f"{backbone} has blocks {names}; cannot unfreeze {blocks}")
        open_blocks = names[-blocks:]
    elif strategy == "full":
        open_blocks = names
    else:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES[:3]}")
    base = model.get_layer("backbone")
    base.trainable = bool(open_blocks)  # propagates to nested models and all their layers
    for layer in _leaf_layers(base):
        # Fine-tuning part of a net keeps BatchNormalization's scale and statistics.
        keep_bn = isinstance(layer, layers.BatchNormalization) and strategy != "full"
        layer.trainable = block_of(backbone, layer.name) in open_blocks and not keep_bn
    return list(open_blocks)


def copy_backbone(source: keras.Model, target: keras.Model) -> None:
    """Start `target` from `source`'s backbone weights (progressive transfer)."""
    src, dst = source.get_layer("backbone"), target.get_layer("backbone")
    src_w, dst_w = src.get_weights(), dst.get_weights()
    if len(src_w) != len(dst_w) or any(
        a.shape != b.shape for a, b in zip(src_w, dst_w, strict=True)
    ):
        raise ValueError("the source run's backbone does not match this backbone")
    dst.set_weights(src_w)


def load(path: str | Path) -> keras.Model:
    return keras.saving.load_model(path, compile=False)
