"""Engines that run the backbone: PyTorch, or the same graph exported to ONNX and run by OpenVINO or ONNX Runtime.

On the CPU the exported graph runs faster than PyTorch: in fp32 (a CPU without native bf16, such as an AMD
EPYC Milan) OpenVINO and ONNX Runtime give PyTorch's numbers (embeddings within 1e-6); in bf16 OpenVINO is
1.3x PyTorch's autocast on the backbone but not the same to the last bit, so ``auto`` serves it only for
weights whose calibration records a passed ``oaml check-engine`` (bench/RESULTS.md, "Engine accuracy
check"). On CUDA, PyTorch. :func:`select_engine` is that rule; ``OAML_ENGINE`` forces one.

The exported graph is cached by model version (exporting takes seconds; a later start reads the file).
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from model.cpu import cpu_has_amx
from model.digests import file_sha256
from model.net import OAMLNet, OAMLOutput
from model.quantize import Int8Recipe, quantised_copy

__all__ = [
    "EngineName",
    "select_engine",
    "serve_int8",
    "openvino_available",
    "exported_graph",
    "private_folder",
    "OnnxBackbone",
    "OpenVinoBackbone",
    "ENGINES",
]

logger = logging.getLogger(__name__)

EngineName = Literal["torch", "onnxruntime", "openvino"]
ENGINES: tuple[str, ...] = ("auto", "torch", "onnxruntime", "openvino")


def openvino_available() -> bool:
    """Whether OpenVINO can be imported here (a dependency, but wheels do not exist for every platform)."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def select_engine(
    setting: str,
    device: torch.device,
    autocast: torch.dtype | None,
    vouched: Collection[tuple[str, str]] = (),
) -> EngineName:
    """What runs the backbone. ``auto``, on a CPU: in fp32 (a CPU without native bf16) OpenVINO, else ONNX
    Runtime, both with PyTorch's numbers and faster; in bf16, OpenVINO where the weights' calibration vouches
    for it (``vouched``: the ``(engine, precision)`` pairs whose ``oaml check-engine`` passed, see
    :mod:`model.training.engine_check`), else PyTorch's bf16 autocast, the calibrated path. On CUDA, PyTorch.

    Forcing an engine: ``onnxruntime`` runs fp32 on the CPU only; ``openvino`` runs fp32 or bf16 on the CPU
    (bf16 unvouched is allowed when forced: the service logs that its calibration was not checked for it).
    """
    if setting not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {setting!r}")
    if setting == "onnxruntime":
        if device.type != "cpu" or autocast is not None:
            raise ValueError("the onnxruntime engine runs fp32 on the CPU: set precision fp32 and device cpu")
        return "onnxruntime"
    if setting == "openvino":
        if device.type != "cpu" or autocast not in (None, torch.bfloat16):
            raise ValueError("the openvino engine runs on the CPU in fp32 or bf16")
        return "openvino"
    if setting == "torch" or device.type != "cpu":
        return "torch"
    if autocast is None:
        return "openvino" if openvino_available() else "onnxruntime"
    if autocast is torch.bfloat16 and ("openvino", "bfloat16") in vouched and openvino_available():
        return "openvino"
    return "torch"


def serve_int8(
    precision: str,
    engine: str,
    device: torch.device,
    autocast: torch.dtype | None,
    vouched: Collection[tuple[str, str]] = (),
    has_recipe: bool = False,
    flags: str | None = None,
) -> bool:
    """Whether the backbone runs in int8 (OpenVINO, :mod:`model.quantize`). Asked for (``precision='int8'``):
    yes, on a CPU, for weights that carry a recipe (``oaml quantize``). ``auto``: on a CPU, where the weights'
    recipe passed ``oaml check-engine`` (``vouched``) and OpenVINO is here, unless the CPU has AMX: there bf16
    is as fast (bench/RESULTS.md: /verify 52 ms in bf16, 55 in int8) and closer to the calibrated path. Without
    native bf16 (an AMD EPYC Milan: ``autocast`` None) int8 is 1.7x OpenVINO's fp32; with AVX-512 bf16 but no
    AMX (an AMD EPYC Genoa), its VNNI int8 kernels do twice the work per instruction of its bf16 ones.
    ``flags``: the CPU's flags (default this CPU's; tests pass others).
    """
    if precision == "int8":
        if device.type != "cpu" or engine not in ("auto", "openvino"):
            raise ValueError("int8 runs on the CPU with the openvino engine")
        if not has_recipe:
            raise ValueError("int8 needs the weights' int8 recipe: run `oaml quantize` on them first")
        if not openvino_available():
            raise ValueError("int8 needs OpenVINO (a dependency: pip install openvino)")
        return True
    return (
        precision == "auto"
        and engine in ("auto", "openvino")
        and device.type == "cpu"
        and (autocast is None or (autocast is torch.bfloat16 and not cpu_has_amx(flags)))
        and has_recipe
        and ("openvino", "int8") in vouched
        and openvino_available()
    )


class _Outputs(torch.nn.Module):
    """The backbone's four outputs as a tuple (what the ONNX graph returns)."""

    def __init__(self, model: OAMLNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model.forward_all(x)
        return out.embedding, out.norm, out.occlusion, out.feature_map


#: The opset the graph is exported at.
OPSET = 17


def export_fingerprint() -> str:
    """What besides the weights decides the exported graph: the network's and the quantiser's code, torch and
    the opset. In the
    file name, so an upgraded service never runs a graph exported by an older one from a kept cache."""
    import hashlib

    import model.net
    import model.quantize

    digest = hashlib.sha256(Path(model.net.__file__).read_bytes())
    digest.update(Path(model.quantize.__file__).read_bytes())
    digest.update(f"{torch.__version__}|{OPSET}".encode())
    return digest.hexdigest()[:12]


def default_cache_dir() -> Path:
    """Where exported graphs are kept: ``OAML_ENGINE_CACHE``, else ``~/.cache/oaml``."""
    return Path(os.environ.get("OAML_ENGINE_CACHE") or Path.home() / ".cache" / "oaml")


def private_folder(folder: Path) -> Path:
    """``folder``, made if missing (mode 0700), once it is known to be this user's alone: owned by this process's
    user, a real folder (not a link), writable by nobody else. Raises :class:`OSError` otherwise: a graph found in
    a folder others can write may have been planted there, and it decides every embedding."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode):
        raise OSError(f"{folder} is not a folder")
    if info.st_uid != os.getuid():
        raise OSError(f"{folder} belongs to another user (uid {info.st_uid})")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise OSError(f"{folder} is writable by other users (mode {stat.S_IMODE(info.st_mode):o})")
    return folder


def exported_graph(
    model: OAMLNet, version: str | None, cache_dir: Path | None = None, int8: Int8Recipe | None = None
) -> tuple[Path, tempfile.TemporaryDirectory[str] | None]:
    """The model's ONNX graph (exported once per version into ``cache_dir``, default :func:`default_cache_dir`),
    and the scratch folder that holds it when it is not kept: weights without a version (nothing to name a kept
    export by), or a cache folder that cannot be written or is not this user's alone (:func:`private_folder`):
    then a fresh private folder of this process's (never a shared, predictable one). Keep the folder as long as
    the graph is used.

    With ``int8``, the graph of :func:`model.quantize.quantised_copy` (QDQ pairs), named by the recipe too."""
    if version is not None:
        folder = cache_dir or default_cache_dir()
        try:
            return OnnxBackbone.export(model, version, private_folder(folder), int8), None
        except OSError as exc:
            logger.warning("not keeping the exported graph in %s (%s): exporting it for this process only", folder, exc)
    scratch = tempfile.TemporaryDirectory(prefix="oaml-engine-")  # mode 0700, an unpredictable name
    return OnnxBackbone.export(model, version or "unversioned", Path(scratch.name), int8), scratch


def _verified(path: Path) -> bool:
    """Whether a kept graph is the one this code exported: its SHA-256 matches the digest written beside it at
    export, and neither file can be written by another user. A graph that fails is exported again."""
    sidecar = path.with_name(path.name + ".sha256")
    try:
        for f in (path, sidecar):
            info = os.lstat(f)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
                return False
        return sidecar.read_text().strip() == file_sha256(path)
    except OSError:
        return False


class OnnxBackbone:
    """``forward_all`` of an :class:`OAMLNet`, run by ONNX Runtime on the CPU in fp32.

    Args:
        model: the network (exported once per ``version`` into ``cache_dir``).
        version: names the export (the weights' ``model_version``; another version exports afresh).
        threads: ONNX Runtime's intra-op threads.
        cache_dir: where the graph is kept (default :func:`default_cache_dir`).
    """

    def __init__(self, model: OAMLNet, version: str | None, threads: int, cache_dir: Path | None = None) -> None:
        import onnxruntime as ort

        self.path, self._scratch = exported_graph(model, version, cache_dir)
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # idle threads sleep instead of spinning: the detector's threads share these cores (OMP_WAIT_POLICY=PASSIVE)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    @staticmethod
    def export(model: OAMLNet, version: str, cache_dir: Path, int8: Int8Recipe | None = None) -> Path:
        """The graph of ``model`` (fake-quantised by ``int8`` if given) at ``cache_dir``, exported unless a file
        for this version, code and recipe is there."""
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in version)
        kind = f"int8-{int8.fingerprint()}" if int8 is not None else "fp32"
        path = cache_dir / f"{safe}.{export_fingerprint()}.{kind}.onnx"
        if path.is_file():
            if _verified(path):
                return path
            logger.warning(
                "the kept graph %s does not match the digest written at its export: exporting it again", path
            )
        cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        source = quantised_copy(model, int8) if int8 is not None else model
        wrapped = _Outputs(source).eval().to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".onnx.tmp")  # mode 0600
        os.close(fd)
        side_tmp: str | None = None
        try:
            with torch.inference_mode(False), torch.no_grad():
                torch.onnx.export(
                    wrapped,
                    (torch.zeros(2, 3, 112, 112),),
                    tmp,
                    input_names=["x"],
                    output_names=["embedding", "norm", "occlusion", "feature_map"],
                    dynamic_axes={"x": {0: "n"}},
                    opset_version=OPSET,
                    dynamo=False,
                )
            digest = file_sha256(Path(tmp))
            sidecar = path.with_name(path.name + ".sha256")
            fd, side_tmp = tempfile.mkstemp(dir=cache_dir, suffix=".sha256.tmp")
            with os.fdopen(fd, "w") as f:
                f.write(digest + "\n")
            # the digest first, then the graph, each whole or not at all (also with several processes starting at
            # once): a reader sees a graph only with the digest of the very export that wrote it
            os.replace(side_tmp, sidecar)
            os.replace(tmp, path)
        finally:
            for leftover in (tmp, side_tmp):
                if leftover is not None and os.path.exists(leftover):
                    os.unlink(leftover)
        logger.info("exported the backbone to %s", path)
        return path

    def forward_all(self, x: torch.Tensor) -> OAMLOutput:
        """The same outputs as :meth:`OAMLNet.forward_all` (fp32 CPU tensors)."""
        inputs: dict[str, Any] = {"x": np.ascontiguousarray(x.detach().float().cpu().numpy())}
        embedding, norm, occlusion, feature_map = self.session.run(None, inputs)
        return OAMLOutput(
            torch.from_numpy(embedding),
            torch.from_numpy(norm),
            torch.from_numpy(occlusion),
            torch.from_numpy(feature_map),
        )


class OpenVinoBackbone:
    """``forward_all`` of an :class:`OAMLNet`, run by OpenVINO on the CPU (the exported ONNX graph, compiled).

    Args:
        model: the network (exported as :class:`OnnxBackbone` exports it, and cached the same way).
        version: names the export.
        threads: OpenVINO's inference threads.
        bf16: infer in bf16 (a CPU that computes it natively), else f32.
        int8: run the network quantised by this recipe (:mod:`model.quantize`): int8 convolutions, the rest
            in f32.
    """

    def __init__(
        self, model: OAMLNet, version: str | None, threads: int, bf16: bool = False, int8: Int8Recipe | None = None
    ) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise RuntimeError("OAML_ENGINE=openvino needs OpenVINO (a dependency: pip install openvino)") from exc
        if bf16 and int8 is not None:
            raise ValueError("the openvino engine runs bf16 or int8, not both")
        path, self._scratch = exported_graph(model, version, int8=int8)
        config = {"INFERENCE_NUM_THREADS": max(1, threads), "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"}
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.path = path

    def forward_all(self, x: torch.Tensor) -> OAMLOutput:
        """The same outputs as :meth:`OAMLNet.forward_all` (fp32 CPU tensors)."""
        result = self.compiled(np.ascontiguousarray(x.detach().float().cpu().numpy()))
        outputs = [torch.from_numpy(np.asarray(result[self.compiled.output(i)], dtype=np.float32)) for i in range(4)]
        return OAMLOutput(*outputs)
