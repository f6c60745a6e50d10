"""RetinaFace-MobileNet0.25 as a PyTorch module, its weights read from the shipped ONNX graph.

Why a PyTorch copy of a network we already run with onnxruntime: on a GPU host the detector should
run on the model's device, in one batch with the detections of concurrent requests, through the
same worker thread that owns the embedding model (see ``service/engine.py``). onnxruntime's CUDA
provider is a separate multi-gigabyte wheel with its own memory pool and stream; a torch module
shares both with the embedding model and needs nothing beyond the ``torch`` we already install.

The topology is biubug6/Pytorch_Retinaface's ``mobilenet0.25`` configuration (MobileNetV1 body,
three-level FPN, SSH context modules, 1x1 class/box/landmark heads, two anchors per location) with
the batch norms folded into the convolutions, exactly as the exported graph has them. Weights come
from the ONNX initializers by node name; the loader refuses a graph in which any parameter is
missing, unused or of another shape, so a different file cannot load silently.

Input: ``[N, 3, H, W]`` float, BGR minus the mean ``(104, 117, 123)``, ``H`` and ``W`` multiples of
32. Output: ``loc [N, A, 4]``, ``conf [N, A, 2]`` (softmaxed), ``landmarks [N, A, 10]``, anchors in
the order of :func:`model.align.priors` (level, row, column, anchor).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RetinaFaceMNet", "load_retinaface_onnx"]

_SLOPE = 0.1  # LeakyReLU slope of every activated convolution in this configuration


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=True)


class _DepthwiseSeparable(nn.Module):
    """MobileNetV1 block: 3x3 depthwise then 1x1 pointwise, each followed by LeakyReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.depthwise = _conv(cin, cin, 3, stride, groups=cin)
        self.pointwise = _conv(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.depthwise(x), _SLOPE)
        return F.leaky_relu(self.pointwise(x), _SLOPE)


class _SSH(nn.Module):
    """Single-stage headless context module: 3x3, 5x5 and 7x7 receptive fields (as stacked 3x3)."""

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        self.conv3x3 = _conv(channels, channels // 2, 3)
        self.conv5x5_1 = _conv(channels, channels // 4, 3)
        self.conv5x5_2 = _conv(channels // 4, channels // 4, 3)
        self.conv7x7_2 = _conv(channels // 4, channels // 4, 3)
        self.conv7x7_3 = _conv(channels // 4, channels // 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c5_1 = F.leaky_relu(self.conv5x5_1(x), _SLOPE)
        c7_2 = F.leaky_relu(self.conv7x7_2(c5_1), _SLOPE)
        return F.relu(torch.cat([self.conv3x3(x), self.conv5x5_2(c5_1), self.conv7x7_3(c7_2)], dim=1))


class RetinaFaceMNet(nn.Module):
    """RetinaFace with a MobileNet-0.25 body (batch norms folded); see the module docstring."""

    #: (input channels, output channels, stride) of the depthwise-separable blocks, by stage
    STAGES: tuple[tuple[tuple[int, int, int], ...], ...] = (
        ((8, 16, 1), (16, 32, 2), (32, 32, 1), (32, 64, 2), (64, 64, 1)),
        ((64, 128, 2), (128, 128, 1), (128, 128, 1), (128, 128, 1), (128, 128, 1), (128, 128, 1)),
        ((128, 256, 2), (256, 256, 1)),
    )
    ANCHORS = 2

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv(3, 8, 3, stride=2)
        self.stages = nn.ModuleList(
            nn.Sequential(*(_DepthwiseSeparable(i, o, s) for i, o, s in stage)) for stage in self.STAGES
        )
        widths = [stage[-1][1] for stage in self.STAGES]  # 64, 128, 256
        self.lateral = nn.ModuleList(_conv(w, 64, 1) for w in widths)
        self.merge = nn.ModuleList(_conv(64, 64, 3) for _ in range(2))  # merge1 (stride 8), merge2 (stride 16)
        self.ssh = nn.ModuleList(_SSH(64) for _ in range(3))
        self.class_head = nn.ModuleList(_conv(64, self.ANCHORS * 2, 1) for _ in range(3))
        self.bbox_head = nn.ModuleList(_conv(64, self.ANCHORS * 4, 1) for _ in range(3))
        self.landmark_head = nn.ModuleList(_conv(64, self.ANCHORS * 10, 1) for _ in range(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.leaky_relu(self.stem(x), _SLOPE)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        p1, p2, p3 = (F.leaky_relu(conv(f), _SLOPE) for conv, f in zip(self.lateral, feats, strict=True))
        p2 = F.leaky_relu(self.merge[1](p2 + F.interpolate(p3, size=p2.shape[-2:], mode="nearest")), _SLOPE)
        p1 = F.leaky_relu(self.merge[0](p1 + F.interpolate(p2, size=p1.shape[-2:], mode="nearest")), _SLOPE)
        levels = [ssh(p) for ssh, p in zip(self.ssh, (p1, p2, p3), strict=True)]
        n = x.shape[0]

        def head(convs: nn.ModuleList, width: int) -> torch.Tensor:
            return torch.cat(
                [conv(f).permute(0, 2, 3, 1).reshape(n, -1, width) for conv, f in zip(convs, levels, strict=True)],
                dim=1,
            )

        return head(self.bbox_head, 4), head(self.class_head, 2).softmax(dim=-1), head(self.landmark_head, 10)


def _onnx_key(node_output: str) -> str | None:
    """Our parameter prefix for an exported Conv node (by its output name), None for the duplicate.

    The exporter names nodes after biubug6's modules (``/fx/stage1/stage1.1/stage1.1.0/...``); the
    tracer recorded SSH's ``conv5X5_1`` twice (``conv5X5_1.0_1``), with the same initializers.
    """
    parts = [p for p in node_output.split("/") if p][:-1]  # drop "Conv_output_0"
    top, leaf = parts[0], parts[-1]
    if leaf.endswith("_1"):
        return None
    if top == "fx":  # MobileNet body: stageS.B.C.0 (block B of stage S; C=0 depthwise, 1 pointwise)
        stage, block, which = (int(v) for v in leaf.removeprefix("stage").split(".")[:3])
        if stage == 1 and block == 0:
            return "stem"
        block -= 1 if stage == 1 else 0
        return f"stages.{stage - 1}.{block}.{'depthwise' if which == 0 else 'pointwise'}"
    if top == "fpn":
        name = leaf.split(".")[0]  # output1..3, merge1..2
        index = int(name[-1]) - 1
        return f"{'lateral' if name.startswith('output') else 'merge'}.{index}"
    if top.startswith("ssh"):
        return f"ssh.{int(top[3:]) - 1}.{leaf.split('.')[0].lower()}"
    if top in ("class_head", "bbox_head", "landmark_head"):
        return f"{top}.{int(leaf.split('.')[-1])}"
    raise ValueError(f"unexpected Conv node {node_output!r} in the RetinaFace graph")


def load_retinaface_onnx(path: str | Path, expected_sha256: str | None = None) -> RetinaFaceMNet:
    """A :class:`RetinaFaceMNet` holding the weights of the exported ONNX graph at ``path``.

    Raises:
        ValueError: the file's hash differs from ``expected_sha256``, or its convolutions do not map
            one-to-one, shape for shape, onto the module's parameters.
    """
    import onnx
    from onnx import numpy_helper

    blob = Path(path).read_bytes()
    if expected_sha256 is not None and hashlib.sha256(blob).hexdigest() != expected_sha256:
        raise ValueError(f"detector weights {path} do not have the expected SHA-256 {expected_sha256}")
    graph = onnx.load_from_string(blob).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}
    net = RetinaFaceMNet()
    params = dict(net.named_parameters())
    state: dict[str, torch.Tensor] = {}
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        prefix = _onnx_key(node.output[0])
        if prefix is None:
            continue
        for suffix, name in zip(("weight", "bias"), node.input[1:3], strict=True):
            key = f"{prefix}.{suffix}"
            value = np.array(arrays[alias.get(name, name)], dtype=np.float32)
            if key not in params or key in state or tuple(params[key].shape) != value.shape:
                raise ValueError(f"ONNX node {node.output[0]} does not fit parameter {key} {value.shape}")
            state[key] = torch.from_numpy(value)
    missing = sorted(set(params) - set(state))
    if missing:
        raise ValueError(f"the ONNX graph has no weights for {missing}")
    net.load_state_dict(state, strict=True)
    return net.eval()
