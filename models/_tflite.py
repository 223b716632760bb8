"""Shared by the TFLite build scripts: convert a tf.function to .tflite (fp32 or int8) and run a .tflite file.

Build-only: needs TensorFlow, which is never a dependency of edgefn itself. The files it makes have one
signature (`serving_default`) with input `pixels` float32 [-1, 64] and outputs `label` int64 [-1] and
`probabilities` float32 [-1, 10]. The batch dimension stays dynamic (shape_signature -1): the interpreter
allocates batch 1 until the input is resized, which the signature runner does by itself on every call.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tensorflow as tf

SIGNATURE = "serving_default"
PIXELS = tf.TensorSpec([None, 64], tf.float32, name="pixels")


def convert(fn: Callable, calibration: np.ndarray | None = None) -> bytes:
    """Convert `fn` (a tf.function taking PIXELS, returning {label, probabilities}) to .tflite bytes.

    `fn` must capture its weights as constants (tf.constant of numpy arrays): Keras variables would stay
    resource variables in the file, which full-integer calibration cannot read.
    With `calibration` (float32 [n, 64]), post-training full-integer quantization: int8 weights and
    activations, calibrated on those rows; input and outputs stay float32/int64 so callers do not change.
    """
    # Through a SavedModel: converting a concrete function directly writes no signature, and the
    # signature is what names the outputs `label` and `probabilities` in the .tflite file.
    module = tf.Module()
    module.fn = fn
    with tempfile.TemporaryDirectory() as saved:
        tf.saved_model.save(module, saved, signatures={SIGNATURE: fn.get_concrete_function(PIXELS)})
        converter = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=[SIGNATURE])
        if calibration is not None:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            # One row per step, as the runtime mostly sees them: the ranges are those of single inferences.
            converter.representative_dataset = lambda: ([row[None, :]] for row in calibration)
            # Integer kernels only: conversion fails rather than leaving a float op behind silently.
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.float32
            converter.inference_output_type = tf.float32
        return converter.convert()


def interpreter(path: Path):
    """The LiteRT interpreter the runtime uses (ai-edge-litert), else TensorFlow's own copy of it."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = tf.lite.Interpreter  # the same class, from TensorFlow
    return Interpreter(model_path=str(path), num_threads=1)


def run(path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(label, probabilities) for the whole batch `x`, through the file's signature runner."""
    outputs = interpreter(path).get_signature_runner(SIGNATURE)(pixels=x)
    return outputs["label"], outputs["probabilities"]
