"""Reading ONNX graphs to map their initializers onto PyTorch modules (shared by the model ports).

Exported graphs name some weights only by the node that uses them (anonymous MatMul weights,
folded constants); these helpers index producers / consumers of every tensor so a port can find a
weight by following the graph, and check that every parameter got exactly one source and every
initializer was used.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["Graph", "StateBuilder", "check_conv", "check_eps", "load_onnx_module", "node_scope"]


def load_onnx_module() -> Any:
    try:
        import onnx
        import onnx.numpy_helper
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "loading weights from ONNX files needs the onnx package (pip install onnx, or the 'eval' extra: "
            "pip install 'cubistmerge[eval]')"
        ) from error
    return onnx


class Graph:
    """Index of an ONNX graph: initializers, Constant values, producers and consumers of every tensor."""

    def __init__(self, model: Any) -> None:
        onnx = load_onnx_module()
        to_array = onnx.numpy_helper.to_array
        graph = model.graph
        self.nodes = list(graph.node)
        self.initializers = {t.name: to_array(t) for t in graph.initializer}
        self.constants: dict[str, np.ndarray] = {}
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = {}
        for node in self.nodes:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
            if node.op_type == "Constant":
                for attribute in node.attribute:
                    if attribute.name == "value":
                        self.constants[node.output[0]] = to_array(attribute.t)
        self.used: set[str] = set()

    def attributes(self, node: Any) -> dict[str, Any]:
        onnx = load_onnx_module()
        return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    def initializer(self, name: str) -> torch.Tensor:
        self.used.add(name)
        return torch.from_numpy(np.array(self.initializers[name], dtype=np.float32, copy=True))

    def only_consumer(self, tensor: str, op_type: str) -> Any:
        nodes = self.consumers.get(tensor, [])
        if len(nodes) != 1 or nodes[0].op_type != op_type:
            found = [n.op_type for n in nodes]
            raise ValueError(f"expected {tensor!r} to feed exactly one {op_type} node, found {found}")
        return nodes[0]

    def unused_initializers(self) -> list[str]:
        return sorted(set(self.initializers) - self.used)


def node_scope(node: Any) -> str:
    """Dotted module path of an exported node: ``/patch_embed/seq/seq.0/c/Conv`` -> ``patch_embed.seq.0.c``."""
    parts: list[str] = []
    for part in node.name.strip("/").split("/")[:-1]:
        if parts and part.startswith(parts[-1] + "."):
            parts[-1] = part  # "seq", "seq.0": the child of a container is written as container.index
        else:
            parts.append(part)
    return ".".join(parts)


class StateBuilder:
    """Collects a state dict for ``module``, checking names, shapes and that nothing is set twice."""

    def __init__(self, module: nn.Module) -> None:
        self.expected = module.state_dict()
        self.state: dict[str, torch.Tensor] = {}

    def put(self, key: str, value: torch.Tensor, source: str) -> None:
        if key not in self.expected:
            raise KeyError(f"{source} maps to {key!r}, which the model does not have")
        if key in self.state:
            raise ValueError(f"{key!r} set twice (again from {source})")
        target = self.expected[key]
        if value.numel() != target.numel():
            raise ValueError(f"{source}: shape {tuple(value.shape)} does not fit {key!r} {tuple(target.shape)}")
        self.state[key] = value.reshape(target.shape).to(target.dtype)

    def finish(self, graph: Graph, what: str) -> dict[str, torch.Tensor]:
        missing = sorted(set(self.expected) - set(self.state))
        unused = graph.unused_initializers()
        if missing or unused:
            raise ValueError(f"{what}: parameters without a source {missing}; initializers not mapped {unused}")
        return self.state


def check_conv(graph: Graph, node: Any, conv: nn.Module, key: str) -> None:
    attributes = graph.attributes(node)
    expected = {
        "kernel_shape": list(conv.kernel_size),
        "strides": list(conv.stride),
        "pads": list(conv.padding) * 2,
        "group": conv.groups,
    }
    for name, value in expected.items():
        if name in attributes and attributes[name] != value:
            raise ValueError(f"{key}: the graph's {node.op_type} has {name}={attributes[name]}, the model {value}")


def check_eps(graph: Graph, nodes: list[Any], module: nn.Module, key: str) -> None:
    """The scalar added to the variance in a decomposed LayerNorm (``nodes``: its scope) must be the module's eps."""
    for node in nodes:
        if node.op_type != "Add":
            continue
        for name in node.input:
            value = graph.constants.get(name)
            if value is not None and value.ndim == 0:
                if not math.isclose(float(value), module.eps, rel_tol=1e-6):
                    raise ValueError(f"{key}: eps {float(value)} in the graph, {module.eps} in the model")
                return
    raise ValueError(f"{key}: no eps constant found in the graph")
