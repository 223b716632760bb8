"""Build the TFLite variants of `digits` from the shipped `model.onnx`: `model.tflite` and `model.int8.tflite`.

Reads the ONNX file's weights (the Scaler's offset/scale, both layers' weights and biases) and rebuilds the
same function in TensorFlow: input `pixels` float32 [N, 64] (raw 0..16, dynamic batch), outputs `label`
int64 [N] and `probabilities` float32 [N, 10], in one signature `serving_default`. Then

- `model.tflite`: fp32, checked against onnxruntime on the held-out images (labels all equal,
  probabilities within 1e-4);
- `model.int8.tflite`: post-training full-integer quantization (int8 weights and activations) calibrated
  on `calibration.npz`, float32 input and outputs kept; its accuracy must be within 1 point of fp32;
- `calibration.npz` (arrays `x` float32 [200, 64], a fixed seeded sample of training images 0..1399,
  and `y` int64 labels) and `validation.npz` (arrays `x` float32 [397, 64], images 1400..1796, and `y`);
- variants `tflite-fp32` and `tflite-int8` in `model.json`, every other variant kept.

Build-only (needs TensorFlow; edgefn itself does not). Run `models/digits/build.py` first if model.onnx is missing:

    pip install tensorflow-cpu scikit-learn onnx onnxruntime numpy   # a separate build environment
    python models/digits/build_tflite.py [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import tensorflow as tf
from onnx import helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # models/: the shared build helpers
import _data  # noqa: E402
import _tflite  # noqa: E402

HERE = Path(__file__).resolve().parent
MADE_BY = "models/digits/build_tflite.py"
MAX_PROB_DIFF = 1e-4
MAX_INT8_DROP = 0.01
BIG_ROW = 4  # first-layer rows above 4x the median row's largest weight get their own int8 scales


def read_onnx(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(w1, b1, w2, b2) of the scaler + MLP in `path`, the scaler folded into the first layer.

    skl2onnx writes Scaler -> MatMul/Add -> Relu -> MatMul/Add -> Softmax -> ArgMax over `classes`.
    Folding ((x - offset) * scale) @ W1 + b1 == x @ (scale[:, None] * W1) + (b1 - (offset * scale) @ W1)
    leaves no float-range SUB/MUL before the first layer, and int8 then quantizes the raw 0..16 input directly.
    (The converter folds the MUL into the weights by itself anyway.)
    """
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    ops = [node.op_type for node in model.graph.node]
    if "Relu" not in ops or "Softmax" not in ops or ops.count("MatMul") + ops.count("Gemm") != 2:
        raise SystemExit(f"{path}: not the scaler + one-hidden-layer relu MLP this script expects ({ops})")
    offset = scale = None
    layers: list[list[np.ndarray]] = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Scaler":
            offset, scale = np.array(attrs["offset"], np.float64), np.array(attrs["scale"], np.float64)
        elif node.op_type == "MatMul":
            layers.append([inits[node.input[1]], np.zeros(inits[node.input[1]].shape[1])])
        elif node.op_type == "Gemm":
            w = inits[node.input[1]]
            layers.append([w.T if attrs.get("transB") else w, inits[node.input[2]].reshape(-1)])
        elif node.op_type == "Add" and node.input[1] in inits and layers:
            layers[-1][1] = layers[-1][1] + inits[node.input[1]].reshape(-1)
        elif node.op_type == "ArrayFeatureExtractor":
            # The label is classes[argmax]; these are 0..9, so the argmax itself is the label.
            if not np.array_equal(inits[node.input[0]], np.arange(10)):
                raise SystemExit(f"{path}: classes are not 0..9")
    (w1, b1), (w2, b2) = layers
    if offset is not None:
        w1, b1 = scale[:, None] * w1, b1 - (offset * scale) @ w1
    return tuple(a.astype(np.float32) for a in (w1, b1, w2, b2))


def digits_function(
    w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray
) -> tf.types.experimental.PolymorphicFunction:
    """The MLP as a tf.function over PIXELS, returning {label, probabilities}.

    The first layer is split by input pixel into two matmuls whose sum is x @ w1: the scaler multiplied the
    rows of border pixels that are almost always 0 in training by up to 37, and int8 weights (one scale per
    output unit) sized for those rows leave too few steps for all the others (held-out accuracy 0.85
    instead of 0.91). Each half gets its own scales; in float the split changes nothing.
    """
    row_max = np.abs(w1).max(axis=1)
    big = np.flatnonzero(row_max > BIG_ROW * np.median(row_max))
    small = np.setdiff1d(np.arange(len(w1)), big)
    w1_small, w1_big, b1, w2, b2 = (tf.constant(a) for a in (w1[small], w1[big], b1, w2, b2))

    @tf.function(input_signature=[_tflite.PIXELS])
    def digits(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        hidden = tf.matmul(tf.gather(pixels, small, axis=1), w1_small)
        hidden += tf.matmul(tf.gather(pixels, big, axis=1), w1_big)
        logits = tf.matmul(tf.nn.relu(hidden + b1), w2) + b2
        # argmax of the logits == argmax of the softmax, and int8 logits are finer-grained than int8 probabilities.
        return {"label": tf.argmax(logits, axis=1, output_type=tf.int64), "probabilities": tf.nn.softmax(logits)}

    return digits


def build(out: Path) -> dict:
    onnx_path = out / "model.onnx"
    if not onnx_path.exists():
        raise SystemExit(f"{onnx_path} missing: run models/digits/build.py first")
    _data.write_samples(out)
    calibration = np.load(out / "calibration.npz")["x"]
    val = np.load(out / "validation.npz")
    x_val, y_val = val["x"], val["y"]

    digits = digits_function(*read_onnx(onnx_path))
    fp32_path, int8_path = out / "model.tflite", out / "model.int8.tflite"
    fp32_path.write_bytes(_tflite.convert(digits))
    int8_path.write_bytes(_tflite.convert(digits, calibration=calibration))

    # Every check runs the files as written, as the runtime will.
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_label, onnx_probs = session.run(["label", "probabilities"], {"pixels": x_val})
    fp32_label, fp32_probs = _tflite.run(fp32_path, x_val)
    int8_label, _ = _tflite.run(int8_path, x_val)
    prob_diff = float(np.abs(fp32_probs - onnx_probs).max())
    if not np.array_equal(fp32_label, onnx_label) or prob_diff > MAX_PROB_DIFF:
        differ = int((fp32_label != onnx_label).sum())
        raise SystemExit(f"model.tflite disagrees with model.onnx: {differ} labels differ, "
                         f"probabilities differ by up to {prob_diff:.2e}")
    fp32_acc, int8_acc = float((fp32_label == y_val).mean()), float((int8_label == y_val).mean())
    if int8_acc < fp32_acc - MAX_INT8_DROP:
        raise SystemExit(f"model.int8.tflite accuracy {int8_acc:.4f} is more than 1 point below fp32 {fp32_acc:.4f}")

    variants = [
        _data.variant("tflite-fp32", fp32_path, "tflite", "fp32", fp32_acc, MADE_BY),
        _data.variant("tflite-int8", int8_path, "tflite", "int8", int8_acc, MADE_BY),
    ]
    _data.merge_variants(out / "model.json", variants)
    print(f"model.tflite agrees with model.onnx (probabilities within {prob_diff:.1e})")
    return {v["name"]: v for v in variants}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE,
                        help="folder holding model.onnx and model.json, written into (default: beside this script)")
    for v in build(parser.parse_args().out).values():
        print(f"digits {v['name']}: accuracy {v['accuracy']:.4f}, {v['size']} bytes, sha256 {v['sha256'][:16]}...")


if __name__ == "__main__":
    main()
