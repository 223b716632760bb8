"""Build the `digits-cnn` model from scratch: a small convolutional network on scikit-learn's 8x8 digits.

Same interface as `digits`, so one function can call either: input `pixels` float32 [N, 64] (raw values
0..16, dynamic batch), outputs `label` int64 [N] and `probabilities` float32 [N, 10]. The network reshapes
the pixels to 8x8, upsamples them x4 (nearest neighbour, exact in ONNX and TFLite) to 32x32 and runs four
3x3 convolutions on them: deliberately heavier than `digits` (about 1-2 ms per single-threaded inference on
a desktop CPU), for measuring a model whose compute is not negligible next to the runtime's overhead.

Trains with Keras (seeded) on images 0..1399 and writes, from the trained weights:

- `model.onnx`: fp32, opset 17, built node by node with onnx.helper (NCHW);
- `model.tflite`: fp32; `model.int8.tflite`: post-training full-integer quantization (int8 weights and
  activations) calibrated on `calibration.npz`, float32 input and outputs kept;
- `calibration.npz` (arrays `x` float32 [200, 64], a fixed seeded sample of training images 0..1399,
  and `y` int64 labels) and `validation.npz` (arrays `x` float32 [397, 64], images 1400..1796, and `y`);
- `model.json`: variants `fp32`, `tflite-fp32`, `tflite-int8`, accuracy measured on images 1400..1796 by
  running each file (onnxruntime, the LiteRT interpreter); other variants already there are kept.

Build-only (needs TensorFlow; edgefn itself does not):

    pip install tensorflow-cpu scikit-learn onnx onnxruntime numpy   # a separate build environment
    python models/digits-cnn/build.py [--out DIR] [--epochs N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import keras
import numpy as np
import onnx
import onnxruntime as ort
import tensorflow as tf
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # models/: the shared build helpers
import _data  # noqa: E402
import _tflite  # noqa: E402

HERE = Path(__file__).resolve().parent
MADE_BY = "models/digits-cnn/build.py"
SEED = 0
UPSAMPLE = 4  # 8x8 -> 32x32
# (filters, 2x2 max-pool after), all 3x3 'same' + relu. Most of the work is at 32x32: seven layers there give the
# latency wanted at ~90k weights (the file size grows with the channels, the time with the pixels too).
CONVS = [(32, False)] * 6 + [(32, True), (48, True), (48, False)]
MIN_ACCURACY = 0.95
MIN_LABELS_AGREE = 0.995
MAX_PROB_DIFF = 1e-3
MAX_INT8_DROP = 0.01
BATCH = 32

Layer = tuple  # ("conv", kernel HWIO, bias) | ("pool",) | ("dense", kernel [in, out], bias)


def shifted(x: np.ndarray) -> np.ndarray:
    """`x` and its four copies moved one pixel up/down/left/right (zero fill): digits drawn off-centre."""
    images = x.reshape(-1, 8, 8)
    out = [images]
    for axis, step in ((1, 1), (1, -1), (2, 1), (2, -1)):
        moved = np.roll(images, step, axis=axis)
        edge = [slice(None)] * 3
        edge[axis] = 0 if step == 1 else -1
        moved[tuple(edge)] = 0
        out.append(moved)
    return np.concatenate(out).reshape(-1, 64)


def train(x: np.ndarray, y: np.ndarray, epochs: int) -> keras.Model:
    keras.utils.set_random_seed(SEED)
    tf.config.experimental.enable_op_determinism()  # the same weights on every run on one machine
    layers: list[keras.layers.Layer] = [
        keras.Input((64,)), keras.layers.Reshape((8, 8, 1)), keras.layers.Rescaling(1 / 16),
        keras.layers.UpSampling2D(UPSAMPLE),
    ]
    for filters, pool in CONVS:
        # He initialization: with Keras' default (Glorot) this plain relu stack, no batch norm, can stall at chance.
        layers.append(keras.layers.Conv2D(filters, 3, padding="same", activation="relu",
                                          kernel_initializer="he_normal"))
        if pool:
            layers.append(keras.layers.MaxPooling2D(2))
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dropout(0.3), keras.layers.Dense(10)]
    model = keras.Sequential(layers)
    x, y = shifted(x), np.tile(y, 5)
    steps = epochs * -(-len(x) // BATCH)
    model.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(1e-3, steps)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=True, verbose=2)
    return model


def weights_of(model: keras.Model) -> list[Layer]:
    """The trained network as plain numpy layers, in order: what both exporters below build from.

    The layers without weights around them (reshape to 8x8, /16, x4 upsampling, global average pooling before
    the dense layer; dropout does nothing at inference) are written out by each exporter itself.
    """
    out: list[Layer] = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            out.append(("conv", *(w.astype(np.float32) for w in layer.get_weights())))
        elif isinstance(layer, keras.layers.MaxPooling2D):
            out.append(("pool",))
        elif isinstance(layer, keras.layers.Dense):
            out.append(("dense", *(w.astype(np.float32) for w in layer.get_weights())))
    return out


def tf_function(layers: list[Layer]) -> tf.types.experimental.PolymorphicFunction:
    """The network over PIXELS with its weights as constants, for the TFLite converter (NHWC)."""
    consts = [tuple(tf.constant(w) for w in layer[1:]) for layer in layers]

    @tf.function(input_signature=[_tflite.PIXELS])
    def digits_cnn(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        x = tf.reshape(pixels, [-1, 8, 8, 1]) * (1 / 16)
        # Nearest neighbour with integer factor: every output pixel copies input pixel (i // 4, j // 4).
        x = tf.image.resize(x, [8 * UPSAMPLE, 8 * UPSAMPLE], method="nearest")
        for (kind, *_), weights in zip(layers, consts, strict=True):
            if kind == "conv":
                x = tf.nn.relu(tf.nn.conv2d(x, weights[0], strides=1, padding="SAME") + weights[1])
            elif kind == "pool":
                x = tf.nn.max_pool2d(x, 2, 2, "VALID")
            else:
                x = tf.matmul(tf.reduce_mean(x, axis=[1, 2]), weights[0]) + weights[1]
        return {"label": tf.argmax(x, axis=1, output_type=tf.int64), "probabilities": tf.nn.softmax(x)}

    return digits_cnn


def onnx_model(layers: list[Layer]) -> onnx.ModelProto:
    """The same network as an ONNX graph (opset 17, NCHW, batch dimension `N`)."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    def node(op: str, inputs: list[str], name: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    # [N, 64] is row-major 8x8, so reshaping to [N, 1, 8, 8] (NCHW) reads the same pixels as NHWC [N, 8, 8, 1].
    x = node("Reshape", ["pixels", const("image_shape", np.array([-1, 1, 8, 8], np.int64))], "image")
    x = node("Mul", [x, const("inv_16", np.array(1 / 16, np.float32))], "scaled")
    # asymmetric + floor: output pixel i reads input pixel floor(i / 4), the same copy as TensorFlow's.
    x = node("Resize", [x, "", const("upsample_scales", np.array([1, 1, UPSAMPLE, UPSAMPLE], np.float32))], "upsampled",
             mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    for i, (kind, *weights) in enumerate(layers):
        if kind == "conv":
            kernel = weights[0].transpose(3, 2, 0, 1)  # Keras HWIO -> ONNX OIHW
            x = node("Conv", [x, const(f"conv{i}_w", kernel), const(f"conv{i}_b", weights[1])], f"conv{i}",
                     kernel_shape=list(kernel.shape[2:]), pads=[1, 1, 1, 1])
            x = node("Relu", [x], f"relu{i}")
        elif kind == "pool":
            x = node("MaxPool", [x], f"pool{i}", kernel_shape=[2, 2], strides=[2, 2])
        else:
            x = node("Flatten", [node("GlobalAveragePool", [x], "gap")], "features")
            x = node("Gemm", [x, const("dense_w", weights[0]), const("dense_b", weights[1])], "logits")
    nodes.append(helper.make_node("Softmax", [x], ["probabilities"], axis=1))
    nodes.append(helper.make_node("ArgMax", [x], ["label"], axis=1, keepdims=0))
    graph = helper.make_graph(
        nodes, "digits_cnn",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name=MADE_BY)
    model.ir_version = 8  # what opset 17 needs; loads in onnxruntime 1.17 and later
    onnx.checker.check_model(model, full_check=True)
    return model


def build(out: Path, epochs: int) -> dict:
    _data.write_samples(out)
    x_train, y_train, _, _ = _data.load_digits_split()
    calibration = np.load(out / "calibration.npz")["x"]
    val = np.load(out / "validation.npz")
    x_val, y_val = val["x"], val["y"]

    model = train(x_train, y_train, epochs)
    keras_probs = tf.nn.softmax(model.predict(x_val, verbose=0)).numpy()
    layers = weights_of(model)
    onnx_path, fp32_path, int8_path = out / "model.onnx", out / "model.tflite", out / "model.int8.tflite"
    onnx_path.write_bytes(onnx_model(layers).SerializeToString())
    fn = tf_function(layers)
    fp32_path.write_bytes(_tflite.convert(fn))
    int8_path.write_bytes(_tflite.convert(fn, calibration=calibration))

    # Every check runs the files as written, as the runtime will.
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_label, onnx_probs = session.run(["label", "probabilities"], {"pixels": x_val})
    fp32_label, fp32_probs = _tflite.run(fp32_path, x_val)
    int8_label, _ = _tflite.run(int8_path, x_val)
    accuracy = {name: float((label == y_val).mean())
                for name, label in (("fp32", onnx_label), ("tflite-fp32", fp32_label), ("tflite-int8", int8_label))}
    if accuracy["fp32"] < MIN_ACCURACY:
        raise SystemExit(f"model.onnx accuracy {accuracy['fp32']:.4f} on the held-out images is below {MIN_ACCURACY}")
    prob_diff = float(max(np.abs(onnx_probs - keras_probs).max(), np.abs(fp32_probs - onnx_probs).max()))
    agree = float((fp32_label == onnx_label).mean())
    if agree < MIN_LABELS_AGREE or prob_diff > MAX_PROB_DIFF:
        raise SystemExit(f"Keras, model.onnx and model.tflite disagree: labels {agree:.2%} equal, "
                         f"probabilities differ by up to {prob_diff:.2e}")
    if accuracy["tflite-int8"] < accuracy["tflite-fp32"] - MAX_INT8_DROP:
        raise SystemExit(f"model.int8.tflite accuracy {accuracy['tflite-int8']:.4f} is more than 1 point below "
                         f"fp32 {accuracy['tflite-fp32']:.4f}")

    variants = [
        _data.variant("fp32", onnx_path, "onnx", "fp32", accuracy["fp32"], MADE_BY),
        _data.variant("tflite-fp32", fp32_path, "tflite", "fp32", accuracy["tflite-fp32"], MADE_BY),
        _data.variant("tflite-int8", int8_path, "tflite", "int8", accuracy["tflite-int8"], MADE_BY),
    ]
    meta = {
        "name": "digits-cnn",
        "inputs": [{"name": "pixels", "dtype": "float32", "shape": [-1, 64]}],
        "outputs": [
            {"name": "label", "dtype": "int64", "shape": [-1]},
            {"name": "probabilities", "dtype": "float32", "shape": [-1, 10]},
        ],
        "dataset": "sklearn.datasets.load_digits",
        "train": f"images 0..{_data.TRAIN - 1}",
        "validation": f"images {_data.TRAIN}..{_data.TRAIN + len(y_val) - 1}",
        "variants": variants[:1],  # fp32 first: the registry loads the first variant
    }
    _data.merge_variants(out / "model.json", variants[1:], meta=meta)
    print(f"Keras, model.onnx and model.tflite agree: labels {agree:.2%} equal, probabilities within {prob_diff:.1e}")
    return {v["name"]: v for v in variants}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: beside this script)")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs over the shifted images (default: 8)")
    args = parser.parse_args()
    for v in build(args.out, args.epochs).values():
        print(f"digits-cnn {v['name']}: accuracy {v['accuracy']:.4f}, {v['size']} bytes, sha256 {v['sha256'][:16]}...")


if __name__ == "__main__":
    main()
