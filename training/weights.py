"""Pretrained weights from local files, imported into Keras models and checked.

In the manner of timm's `load_pretrained`: one function per weight source, each with
a declared mapping from the file's tensors onto the model's layers, and a check that
every weight tensor of the file was used and every shape matched. Anything else (a
tensor left over, a layer left without weights, a shape that differs) fails loudly
with a WeightImportError naming the tensor and the layer: a half-loaded network
still trains, and nobody would notice it was not the pretrained one.

Sources:
- `keras_file`: Keras' own `.h5` / `.weights.h5` (Keras checks layer counts and shapes).
- `tflite`: an ImageNet TFLite model (MobileNetV2 TF2 post-training-quantised or TF-Slim
  quantisation-aware, MobileNetV1): int8 / uint8 kernels dequantised per channel, the
  batch norm folded into each convolution restored as kernel + BatchNormalization
  layer (gamma 1, beta the folded bias, moving mean 0, moving variance 1 - epsilon).
- `squeezenet_h5`: SqueezeNet v1.1 in the Keras-1 HDF5 layout (groups `conv1`,
  `fire2` ... `fire9`, datasets `<group>/<layer>/<weight>`).

`load` picks the source from the file. `tflite_outputs` runs the file itself (the
TFLite interpreter) for parity checks against the imported model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
from keras import layers

from thyroid_cad.files import sha256_file

# TFLite ops that carry weights (input 1: kernel, input 2: bias), and those that carry
# none. Any other op in a file means an architecture this importer does not know.
_WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
_PLAIN_OPS = (
    "ADD",
    "AVERAGE_POOL_2D",
    "MEAN",
    "RESHAPE",
    "SOFTMAX",
    "QUANTIZE",
    "DEQUANTIZE",
    "PAD",
    "RELU6",
)
_POOL_OPS = ("MEAN", "AVERAGE_POOL_2D")


class WeightImportError(ValueError):
    """The file does not fit the model (a user error: a clear message, no stack trace)."""


@dataclass
class Report:
    """What a load did: logged with the run and carried by the model card."""

    path: str
    sha256: str
    format: str
    tensors_used: int
    skipped: dict[str, str] = field(default_factory=dict)  # tensor -> why (declared)


def is_tflite(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".tflite"


def is_keras1_squeezenet(path: str | Path) -> bool:
    """Keras 1 HDF5 weights with SqueezeNet's fire modules (no keras_version, 'fire2')."""
    if Path(path).suffix.lower() != ".h5":
        return False
    import h5py

    with h5py.File(path, "r") as f:
        names = [n.decode() if isinstance(n, bytes) else n for n in f.attrs.get("layer_names", [])]
    return "fire2/squeeze1x1" in names


def load(model: keras.Model, path: str | Path) -> Report:
    """Load a weights file of any supported kind into `model` (a backbone without
    classifier, or a network with one); returns what was loaded from where."""
    if is_tflite(path):
        return tflite(model, path)
    if is_keras1_squeezenet(path):
        return squeezenet_h5(model, path)
    return keras_file(model, path)


def keras_file(model: keras.Model, path: str | Path) -> Report:
    """Keras' own weights file: Keras matches layers and checks every shape itself."""
    try:
        model.load_weights(str(path))
    except (ValueError, KeyError, OSError) as e:
        raise WeightImportError(f"{path} does not fit this network: {e}") from e
    return Report(str(path), sha256_file(path), "keras", len(model.weights))


# ---------------------------------------------------------------- TFLite


def _interpreter(path: str | Path, keep_tensors: bool = False):
    import tensorflow as tf

    # Without the default XNNPACK delegate, ops_details lists the file's own ops (the
    # delegate would add DELEGATE nodes that swallow them). tf.lite.Interpreter warns
    # that it moves to ai_edge_litert; it is what this TensorFlow ships.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(
            model_path=str(path),
            experimental_op_resolver_type=(
                tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
            ),
            experimental_preserve_all_tensors=keep_tensors,
        )
    interpreter.allocate_tensors()
    return interpreter


def _ops(interpreter, path) -> list[dict]:
    # _get_ops_details is the interpreter's only view of the graph (no public one).
    ops = interpreter._get_ops_details()
    unknown = sorted({o["op_name"] for o in ops} - set(_WEIGHT_OPS) - set(_PLAIN_OPS))
    if unknown:
        raise WeightImportError(f"{path}: ops {unknown} are not supported by the importer")
    return ops


def _dequantize(interpreter, index: int) -> np.ndarray:
    """A constant tensor as float32: (q - zero point) x scale, per channel where the
    file quantises per channel (along its quantized_dimension)."""
    detail = interpreter._get_tensor_details(index, 0)
    values = interpreter.get_tensor(index)
    q = detail["quantization_parameters"]
    scales, zeros = q["scales"], q["zero_points"]
    if values.dtype == np.float32 or len(scales) == 0:
        return values.astype("float32")
    shape = [1] * values.ndim
    if len(scales) > 1:
        shape[q["quantized_dimension"]] = len(scales)
    scale = scales.reshape(shape).astype("float32")
    zero = zeros.reshape(shape).astype("float32")
    return ((values.astype("float32") - zero) * scale).astype("float32")


def _targets(model: keras.Model) -> list[tuple[layers.Layer, layers.Layer | None]]:
    """(weight layer, its batch-norm layer or None), in network order.

    In Keras' MobileNet applications each convolution without a bias is directly
    followed by its BatchNormalization; that is where the folded batch norm goes.
    """
    leaves = list(_leaf_layers(model))
    out = []
    for i, layer in enumerate(leaves):
        if not isinstance(layer, layers.Conv2D | layers.DepthwiseConv2D | layers.Dense):
            continue
        bn = None
        if not layer.use_bias:
            bn = leaves[i + 1] if i + 1 < len(leaves) else None
            if not isinstance(bn, layers.BatchNormalization):
                raise WeightImportError(
                    f"layer {layer.name} has no bias and no BatchNormalization after it: "
                    "nowhere to put the folded batch norm"
                )
        out.append((layer, bn))
    return out


def _leaf_layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _leaf_layers(layer)
        else:
            yield layer


def _to_keras_kernel(op: str, kernel: np.ndarray, layer: layers.Layer) -> np.ndarray:
    """The file's layouts (conv OHWI, depthwise 1HWC, fully connected OI) -> Keras'."""
    if op == "DEPTHWISE_CONV_2D":
        return kernel[0][..., None]  # H W C 1
    if isinstance(layer, layers.Dense):  # a 1x1 classifier convolution or FULLY_CONNECTED
        return kernel.reshape(kernel.shape[0], -1).T
    return kernel.transpose(1, 2, 3, 0)  # H W I O


def tflite(model: keras.Model, path: str | Path) -> Report:
    """Import a TFLite file's weights into a Keras network of the same architecture.

    The file's weight ops and the model's Conv2D / DepthwiseConv2D / Dense layers are
    matched one to one in network order, each kernel's shape checked. The file's last
    op may be a classifier the model does not have (a backbone without top): it is
    skipped and reported, never silently.
    """
    interpreter = _interpreter(path)
    ops = [o for o in _ops(interpreter, path) if o["op_name"] in _WEIGHT_OPS]
    targets = _targets(model)
    skipped = {}
    if len(ops) == len(targets) + 1 and not any(isinstance(t, layers.Dense) for t, _ in targets):
        last = ops.pop()
        skipped[f"op{last['index']}:{last['op_name']}"] = "ImageNet classifier (no top here)"
    if len(ops) != len(targets):
        raise WeightImportError(
            f"{path} has {len(ops)} weight ops, the network {len(targets)} weight layers: "
            "not the same architecture"
        )
    used = 0
    for op, (layer, bn) in zip(ops, targets, strict=True):
        kernel_index = op["inputs"][1]
        bias_index = op["inputs"][2] if len(op["inputs"]) > 2 else -1
        kernel = _to_keras_kernel(op["op_name"], _dequantize(interpreter, kernel_index), layer)
        # A converter drops an all-zero bias (the op then has input -1 there).
        bias = (
            _dequantize(interpreter, bias_index)
            if bias_index >= 0
            else np.zeros(
                kernel.shape[-1] if op["op_name"] != "DEPTHWISE_CONV_2D" else kernel.shape[2],
                "float32",
            )
        )
        expected = tuple(layer.weights[0].shape)
        if kernel.shape != expected:
            raise WeightImportError(
                f"{path}: op {op['index']} ({op['op_name']}) has kernel {kernel.shape}, "
                f"layer {layer.name} wants {expected}"
            )
        if bn is None:
            layer.set_weights([kernel, bias])
        else:
            layer.set_weights([kernel])
            if bn.moving_variance.shape != bias.shape:
                raise WeightImportError(
                    f"{path}: bias of op {op['index']} is {bias.shape}, batch norm "
                    f"{bn.name} has {tuple(bn.moving_variance.shape)}"
                )
            _restore_folded_bn(bn, bias)
        used += 1 + (bias_index >= 0)
    return Report(str(path), sha256_file(path), "tflite", used, skipped)


def _restore_folded_bn(bn: layers.BatchNormalization, bias: np.ndarray) -> None:
    """A batch norm that passes x through and adds the folded bias: gamma 1, beta bias,
    mean 0, variance 1 - epsilon (so that sqrt(variance + epsilon) is exactly 1)."""
    ones = np.ones_like(bias)
    values = {
        "gamma": ones,
        "beta": bias,
        "moving_mean": np.zeros_like(bias),
        "moving_variance": ones - bn.epsilon,
    }
    bn.set_weights([values[w.name] for w in bn.weights])


def tflite_outputs(path: str | Path, images: np.ndarray) -> dict[str, np.ndarray]:
    """Run the TFLite file on uint8 images (N x 224 x 224 x 3, its input size):
    {'pooled': N x C features at its global pool, 'logits': N x K dequantised
    classifier outputs (absent where the file has no classifier)}."""
    interpreter = _interpreter(path, keep_tensors=True)
    ops = _ops(interpreter, path)
    pool = next(o for o in ops if o["op_name"] in _POOL_OPS)
    weight_ops = [o for o in ops if o["op_name"] in _WEIGHT_OPS]
    classifier = weight_ops[-1] if weight_ops[-1]["index"] > pool["index"] else None
    (inp,) = interpreter.get_input_details()
    out: dict[str, list] = {"pooled": [], "logits": []}
    for image in images:
        interpreter.set_tensor(inp["index"], image[None].astype(inp["dtype"]))
        interpreter.invoke()
        out["pooled"].append(_activation(interpreter, pool["outputs"][0]).reshape(-1))
        if classifier is not None:
            out["logits"].append(_activation(interpreter, classifier["outputs"][0]).reshape(-1))
    return {k: np.stack(v) for k, v in out.items() if v}


def _activation(interpreter, index: int) -> np.ndarray:
    detail = interpreter._get_tensor_details(index, 0)
    scale, zero = detail["quantization"]
    values = interpreter.get_tensor(index).astype("float32")
    return (values - zero) * scale if scale else values


def agreement(keras_out: np.ndarray, file_out: np.ndarray) -> dict[str, float]:
    """How close the imported model is to the file, per image, worst case:
    cosine similarity and relative L2 error ||keras - file|| / ||file||."""
    a, b = keras_out.reshape(len(keras_out), -1), file_out.reshape(len(file_out), -1)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    rel = np.linalg.norm(a - b, axis=1) / (np.linalg.norm(b, axis=1) + 1e-12)
    return {"cosine_min": float(cos.min()), "rel_l2_max": float(rel.max())}


# ---------------------------------------------------------------- SqueezeNet (Keras 1)


def squeezenet_h5(model: keras.Model, path: str | Path) -> Report:
    """SqueezeNet v1.1 weights in the Keras 1 HDF5 layout.

    Declared mapping: file layer `conv1` -> Keras layer `conv1`, `fireN/<part>` ->
    `fireN_<part>` (Keras 3 names cannot hold '/'); each file layer's `weight_names`
    are [kernel (H W I O), bias]. Every file layer with weights must find its Keras
    layer and every Keras layer with weights must be filled.
    """
    import h5py

    wanted = {
        layer.name: layer for layer in _leaf_layers(model) if layer.weights
    }  # what must be filled
    used = 0
    with h5py.File(path, "r") as f:
        for raw in f.attrs["layer_names"]:
            name = raw.decode() if isinstance(raw, bytes) else raw
            group = f[name]
            weight_names = [
                w.decode() if isinstance(w, bytes) else w for w in group.attrs["weight_names"]
            ]
            if not weight_names:
                continue
            target = name.replace("/", "_")
            layer = wanted.pop(target, None)
            if layer is None:
                raise WeightImportError(f"{path}: layer {name} has no Keras layer {target}")
            values = [np.asarray(group[w]) for w in weight_names]
            expected = [tuple(w.shape) for w in layer.weights]
            if [v.shape for v in values] != expected:
                raise WeightImportError(
                    f"{path}: {name} holds {[v.shape for v in values]}, {target} wants {expected}"
                )
            layer.set_weights(values)
            used += len(values)
    if wanted:
        raise WeightImportError(f"{path} has no weights for layers {sorted(wanted)}")
    return Report(str(path), sha256_file(path), "keras1-h5", used)
