"""A width-prunable pre-activation ResNet (He et al., "Identity Mappings in Deep Residual
Networks", 2016), after the ResNets HeteroFL and FedRolex prune, at sizes for small machines.

``model.channels`` gives the stages' widths (e.g. ``[16, 32, 64]``); ``model.options.blocks``
the residual blocks per stage (default 1). The first stage keeps the input's resolution, each
later one halves it with a stride-2 first block. A block is
``x + conv2(relu(norm2(conv1(relu(norm1(x))))))`` with a 1x1 stride-2 shortcut conv where the
width or the resolution changes; the network ends with a norm, ReLU, global average pooling
and the linear head.

Pruning: each stage's residual stream is one unit group (``stage<i>``: the stem's or first
block's output, every block's output in the stage, the shortcut's output), and each block's
inner width is a group of its own (``s<i>b<j>``); a ratio keeps ``ceil(r * width)`` channels
of every group, and every tensor follows the channels it is indexed by (the shortcut and the
head follow the kept channels of their input stage).

Normalization: group norm with one group (a layer norm over channels and space per sample,
with a per-channel affine that is pruned with its channels), not batch norm. It uses no batch
statistics, so there are no running statistics to share across widths (the problem HeteroFL's
static batch norm solves by not tracking them and querying clients afterwards), and a
client's small batches, its label skew and the evaluation's batch size change nothing. As in
HeteroFL, the scaler sits on each conv's output, before the normalization that follows it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from rabo.masks import kept_count
from rabo.models import PrunableModel, conv_input_workspace, register_model
from rabo.submodel import Axis, ParamLayout


class PreActResNet(PrunableModel):
    has_normalization = True
    convolution = True

    def __init__(self, input_shape: tuple[int, ...], classes: int, widths: tuple[int, ...],
                 blocks: int = 1, scaler: str = "none") -> None:
        if len(input_shape) != 3:
            raise ValueError(f"a ResNet needs image inputs (C, H, W); this data has shape "
                             f"{input_shape}")
        if not widths or min(widths) < 1:
            raise ValueError(f"a ResNet needs stage widths >= 1 (model.channels), got {widths}")
        if blocks < 1:
            raise ValueError(f"model.options.blocks: at least one block per stage, got {blocks}")
        if min(input_shape[1:]) // 2 ** (len(widths) - 1) < 1:
            raise ValueError(f"{len(widths)} stages halve a {input_shape[1:]} image to nothing")
        self.input_shape, self.classes = input_shape, classes
        self.widths, self.blocks, self.scaler = tuple(widths), blocks, scaler
        self.groups: dict[str, int] = {}
        self.layout = {}
        self.plan: list[dict[str, Any]] = []  # per block: names, groups, stride
        c = input_shape[0]
        s0 = "stage0"
        self.groups[s0] = widths[0]
        self.layout["stem.weight"] = ParamLayout((widths[0], c, 3, 3),
                                                 (Axis(s0), None, None, None))
        prev_group, prev_width = s0, widths[0]
        for i, w in enumerate(widths):
            g_out = f"stage{i}"
            self.groups[g_out] = w
            for j in range(blocks):
                p, g_mid = f"s{i}b{j}", f"s{i}b{j}"
                self.groups[g_mid] = w
                stride = 2 if (i > 0 and j == 0) else 1
                lay = self.layout
                lay[f"{p}.n1.weight"] = ParamLayout((prev_width,), (Axis(prev_group),))
                lay[f"{p}.n1.bias"] = ParamLayout((prev_width,), (Axis(prev_group),))
                lay[f"{p}.c1.weight"] = ParamLayout((w, prev_width, 3, 3),
                                                    (Axis(g_mid), Axis(prev_group), None, None))
                lay[f"{p}.n2.weight"] = ParamLayout((w,), (Axis(g_mid),))
                lay[f"{p}.n2.bias"] = ParamLayout((w,), (Axis(g_mid),))
                lay[f"{p}.c2.weight"] = ParamLayout((w, w, 3, 3),
                                                    (Axis(g_out), Axis(g_mid), None, None))
                shortcut = stride != 1 or prev_group != g_out
                if shortcut:
                    lay[f"{p}.sc.weight"] = ParamLayout(
                        (w, prev_width, 1, 1), (Axis(g_out), Axis(prev_group), None, None))
                self.plan.append({"prefix": p, "stride": stride, "shortcut": shortcut,
                                  "in": prev_group, "mid": g_mid, "out": g_out})
                prev_group, prev_width = g_out, w
        self.layout["final.weight"] = ParamLayout((prev_width,), (Axis(prev_group),))
        self.layout["final.bias"] = ParamLayout((prev_width,), (Axis(prev_group),))
        self.layout["head.weight"] = ParamLayout((classes, prev_width), (None, Axis(prev_group)))
        self.layout["head.bias"] = ParamLayout((classes,), (None,))
        self.head_names = ("head.weight", "head.bias")
        self.backbone_names = tuple(n for n in self.layout if n not in self.head_names)

    def init(self, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Convs and the head: fan-in uniform (PyTorch's default); norms: weight 1, bias 0."""
        params = super().init(seed, dtype)
        for name in params:
            if name.endswith(("n1.weight", "n2.weight")) or name == "final.weight":
                params[name] = torch.ones_like(params[name])
            elif name.endswith(("n1.bias", "n2.bias")) or name == "final.bias":
                params[name] = torch.zeros_like(params[name])
        return params

    # ------------------------------------------------------------------ forward

    def _norm(self, params: Mapping[str, torch.Tensor], name: str, h: torch.Tensor
              ) -> torch.Tensor:
        return F.group_norm(h, 1, params[f"{name}.weight"], params[f"{name}.bias"])

    def features(self, params: Mapping[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        h = self.scaled(F.conv2d(inputs, params["stem.weight"], padding=1),
                        self.groups["stage0"])
        for b in self.plan:
            p = b["prefix"]
            a = F.relu(self._norm(params, f"{p}.n1", h))
            short = (self.scaled(F.conv2d(a, params[f"{p}.sc.weight"], stride=b["stride"]),
                                 self.groups[b["out"]]) if b["shortcut"] else h)
            z = self.scaled(F.conv2d(a, params[f"{p}.c1.weight"], stride=b["stride"], padding=1),
                            self.groups[b["mid"]])
            z = F.relu(self._norm(params, f"{p}.n2", z))
            z = self.scaled(F.conv2d(z, params[f"{p}.c2.weight"], padding=1),
                            self.groups[b["out"]])
            h = short + z
        h = F.relu(self._norm(params, "final", h))
        return h.mean(dim=(2, 3))

    def head(self, params: Mapping[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, params["head.weight"], params["head.bias"])

    # ------------------------------------------------------------------ cost model

    def _sizes(self) -> list[tuple[int, int]]:
        """(height, width) of each block's output."""
        h, w = self.input_shape[1:]
        out = []
        for b in self.plan:
            if b["stride"] == 2:
                h, w = (h + 1) // 2, (w + 1) // 2
            out.append((h, w))
        return out

    def layer_flops(self, ratio: float = 1.0, batch: int = 1) -> dict[str, int]:
        def k(group: str) -> int:
            return kept_count(ratio, self.groups[group])

        c_in = self.input_shape[0]
        h, w = self.input_shape[1:]
        flops = {"stem": 2 * batch * k("stage0") * c_in * 9 * h * w}
        for b, (ho, wo) in zip(self.plan, self._sizes(), strict=True):
            p, cin, mid, cout = b["prefix"], k(b["in"]), k(b["mid"]), k(b["out"])
            flops[f"{p}.c1"] = 2 * batch * mid * cin * 9 * ho * wo
            flops[f"{p}.c2"] = 2 * batch * cout * mid * 9 * ho * wo
            if b["shortcut"]:
                flops[f"{p}.sc"] = 2 * batch * cout * cin * ho * wo
        flops["head"] = 2 * batch * self.classes * k(self.plan[-1]["out"])
        return flops

    def activation_numel(self, ratio: float = 1.0, batch: int = 1) -> int:
        def k(group: str) -> int:
            return kept_count(ratio, self.groups[group])

        h, w = self.input_shape[1:]
        total = batch * self.input_shape[0] * h * w + batch * k("stage0") * h * w  # stem out
        hi, wi = h, w
        for b, (ho, wo) in zip(self.plan, self._sizes(), strict=True):
            cin, mid, cout = k(b["in"]), k(b["mid"]), k(b["out"])
            total += batch * 2 * cin * hi * wi  # norm1 and its ReLU
            total += batch * 3 * mid * ho * wo  # conv1, norm2, ReLU
            total += batch * (2 + int(b["shortcut"])) * cout * ho * wo  # conv2, add, shortcut
            hi, wi = ho, wo
        last = k(self.plan[-1]["out"])
        total += batch * (2 * last * hi * wi + last + self.classes)  # final norm, ReLU, pool
        return total

    def workspace_numel(self, ratio: float = 1.0, batch: int = 1) -> int:
        return conv_input_workspace(tuple(self.input_shape), batch)  # the stem's input


def _build(model_cfg: Any, input_shape: tuple[int, ...], classes: int) -> PreActResNet:
    blocks = model_cfg.options.get("blocks", 1)
    if not isinstance(blocks, int) or isinstance(blocks, bool):
        raise ValueError(f"model.options.blocks: an integer, got {blocks!r}")
    unknown = sorted(set(model_cfg.options) - {"blocks"})
    if unknown:
        raise ValueError(f"model.options: the resnet takes only 'blocks', got {unknown}")
    return PreActResNet(input_shape, classes, tuple(model_cfg.channels), blocks,
                        model_cfg.scaler)


register_model("resnet", _build)
