"""Model splitting: cut a backbone's torch.fx graph at a layer into an edge part and a cloud part."""

import copy
from collections.abc import Sequence

import torch
from torch import fx
from torchvision.models.feature_extraction import LeafModuleAwareTracer, _set_default_tracer_kwargs

from ._torch import get_layer


class _CutTracer(LeafModuleAwareTracer):
    """torchvision's leaf-aware tracer (torchvision ops and ``math`` kept whole),
    with the cut layer also kept whole so that it is one node of the graph."""

    def __init__(self, cut=None, extra=()):
        super().__init__(**_set_default_tracer_kwargs(None))
        self.keep = {cut, *extra} - {None}

    def is_leaf_module(self, m, module_qualname):
        return module_qualname in self.keep or super().is_leaf_module(m, module_qualname)


def trace(backbone, cut=None, extra=()):
    """Symbolically trace ``backbone`` with the modules ``cut`` and ``extra`` kept as one node each.

    Raises
    ------
    ValueError
        If torch.fx cannot trace the model (data-dependent control flow).
    """
    tracer = _CutTracer(cut, extra)
    try:
        graph = tracer.trace(backbone)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...)
        raise ValueError(
            f"torch.fx could not trace {type(backbone).__name__}, so it cannot be split: {exc}. "
            "Models with data-dependent control flow in forward() need it rewritten "
            "(or moved into a submodule that is not split)."
        ) from exc
    return fx.GraphModule(tracer.root, graph, type(backbone).__name__)


def available_split_points(backbone: torch.nn.Module) -> list[str]:
    """Names of the layers at which :func:`split_model` can cut ``backbone``.

    These are the submodules that the traced forward pass calls, in execution
    order (each listed once, at its first call); containers such as
    ``"layer1"`` are listed along with the layers inside them.

    Parameters
    ----------
    backbone : torch.nn.Module

    Returns
    -------
    names : list of str
        Dotted names, as in ``backbone.named_modules()``.

    Examples
    --------
    >>> import torchvision
    >>> points = available_split_points(torchvision.models.resnet18())
    >>> points[:5]
    ['conv1', 'bn1', 'relu', 'maxpool', 'layer1']
    """
    gm = trace(backbone)
    called = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        parts = node.target.split(".")
        for depth in range(1, len(parts) + 1):  # enclosing containers first
            name = ".".join(parts[:depth])
            if name not in called:
                called.append(name)
    return called


def _cut_outside(backbone, layer, extra_layers):
    """The module whose output is ``layer``'s and that holds none of ``extra_layers``.

    An extra tap inside ``layer`` (``"layer1.1"`` inside ``"layer1"``) must be a
    node of the graph, so ``layer`` cannot be: an ``nn.Sequential``'s output is
    its last child's, so the cut moves down to that child.
    """
    cut = layer
    while any(name.startswith(cut + ".") for name in extra_layers):
        module = backbone.get_submodule(cut)
        children = [n for n, _ in module.named_children()]
        if not isinstance(module, torch.nn.Sequential) or not children:
            raise ValueError(
                f"extra_layers inside {cut!r} can be tapped only when it is an nn.Sequential; "
                f"tap layers that run before {cut!r} instead."
            )
        cut = f"{cut}.{children[-1]}"
    return cut


def split_model(backbone: torch.nn.Module, layer: str, extra_layers: Sequence[str] = (),
                example: "torch.Tensor | None" = None) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Cut ``backbone`` right after ``layer`` (its first call).

    Every tensor computed on the edge side and used on the cloud side crosses
    the cut (skip connections and dense concatenations included); parameters
    and buffers are never sent, the cloud part holds its own.

    Values that are not tensors (the batch size or a patch-grid size read
    from ``x.shape``, as in vision transformers) cannot be sent. Given an
    ``example`` input, the split runs the edge part on it at batch sizes 1
    and 2 and settles each such value on the cloud side: one that is the same
    at both is written into the cloud part as a constant; one that equals the
    batch size is recomputed there as the batch size of a tensor that
    crosses. Any other non-tensor value is refused with a clear error.

    Parameters
    ----------
    backbone : torch.nn.Module
    layer : str
        Dotted module name, one of :func:`available_split_points`.
    extra_layers : sequence of str, default=()
        Layers that run before ``layer`` whose outputs the edge part returns
        too (the detector's extra taps).
    example : torch.Tensor of shape (1, C, H, W), default=None
        One input of the deployed size, used only to settle non-tensor values
        that cross the cut (see above). Without it such values are left in
        the payload and ``check_tensor_payload`` refuses them.

    Returns
    -------
    edge : torch.fx.GraphModule
        ``edge(x)`` returns the tuple ``(activation, *extra, *crossing)``: the
        layer's output, the extra taps' outputs (``edge.n_extra`` of them), then
        the tensors that cross the cut, in execution order.
    cloud : torch.fx.GraphModule
        ``cloud(*crossing)`` returns the original model's output.

    Examples
    --------
    >>> import torch
    >>> from earlin_sklearn import split_model
    >>> from earlin_sklearn.models import cifar_resnet
    >>> model = cifar_resnet(20).eval()
    >>> edge, cloud = split_model(model, "layer1")
    >>> x = torch.randn(2, 3, 32, 32)
    >>> activation, *crossing = edge(x)
    >>> torch.allclose(cloud(*crossing), model(x), atol=1e-5)
    True
    """
    get_layer(backbone, layer)
    extra_layers = list(extra_layers)
    for name in extra_layers:
        get_layer(backbone, name)
    layer = _cut_outside(backbone, layer, extra_layers)
    gm = trace(backbone, cut=layer, extra=extra_layers)
    nodes = list(gm.graph.nodes)

    def first_call(name):
        return next((i for i, n in enumerate(nodes) if n.op == "call_module" and n.target == name), None)

    cut_at = first_call(layer)
    if cut_at is None:
        raise ValueError(
            f"{layer!r} is never called as a module in the traced forward pass, so the model "
            f"cannot be cut there. Valid cut layers: available_split_points(backbone)."
        )
    extra_at = [first_call(name) for name in extra_layers]
    for name, at in zip(extra_layers, extra_at):
        if at is None or at > cut_at:
            raise ValueError(f"The extra tap {name!r} does not run before {layer!r}, so it is not on the edge.")
    edge_nodes = nodes[: cut_at + 1]
    edge_set = set(edge_nodes)
    crossing = [
        n for n in edge_nodes if n.op != "get_attr" and any(user not in edge_set for user in n.users)
    ]
    outputs = [nodes[cut_at], *[nodes[i] for i in extra_at]]
    settled = {}
    if example is not None:
        probe = fx.GraphModule(gm, _edge_graph(edge_nodes, outputs + crossing), "EdgeProbe")
        settled = _settle_non_tensors(probe, example, crossing, len(outputs))
        crossing = [n for n in crossing if n not in settled]

    cloud_graph, cloud_env = fx.Graph(), {}
    for node in crossing:
        cloud_env[node] = cloud_graph.placeholder(node.name)
    for node, (kind, value) in settled.items():
        # a batch size is read from the first crossing tensor with a batch dimension; a constant is written in
        cloud_env[node] = value if kind == "constant" else cloud_graph.call_method("size", (cloud_env[value], 0))

    def cloud_arg(arg):
        if arg not in cloud_env:  # a parameter or buffer read on the edge side: read it again
            cloud_env[arg] = cloud_graph.node_copy(arg)
        return cloud_env[arg]

    for node in nodes[cut_at + 1 :]:
        cloud_env[node] = cloud_graph.node_copy(node, cloud_arg)

    edge = fx.GraphModule(gm, _edge_graph(edge_nodes, outputs + crossing), "EdgePrefix")
    cloud = fx.GraphModule(gm, cloud_graph, "CloudSuffix")
    edge.crossing_names = [n.name for n in crossing]
    edge.n_extra = len(extra_layers)
    edge.settled = {n.name: kind for n, (kind, _) in settled.items()}
    return edge, cloud


def _edge_graph(edge_nodes, outputs):
    graph, env = fx.Graph(), {}
    for node in edge_nodes:
        env[node] = graph.node_copy(node, lambda a: env[a])
    graph.output(tuple(env[n] for n in outputs))
    return graph


_LITERALS = (int, float, bool, str, type(None), torch.dtype, torch.device)


def _is_literal(value):
    if isinstance(value, (tuple, list)):  # torch.Size included
        return all(_is_literal(v) for v in value)
    return isinstance(value, _LITERALS)


def _settle_non_tensors(probe, example, crossing, n_outputs):
    """``{node: ("constant", value) | ("batch", tensor node)}`` for the non-tensor values that cross."""
    if example.dim() < 1 or example.shape[0] != 1:
        raise ValueError(f"split_model's example must be one input of shape (1, ...); got {tuple(example.shape)}.")
    with torch.no_grad():
        one = probe(example)[n_outputs:]
        two = probe(torch.cat([example, example]))[n_outputs:]
    batched = next((n for n, a, b in zip(crossing, one, two) if isinstance(a, torch.Tensor)
                    and a.dim() > 0 and a.shape[0] == 1 and b.shape[0] == 2), None)
    settled = {}
    for node, a, b in zip(crossing, one, two):
        if isinstance(a, torch.Tensor):
            continue
        if _is_literal(a) and a == b:
            settled[node] = ("constant", a)
        elif isinstance(a, int) and not isinstance(a, bool) and (a, b) == (1, 2) and batched is not None:
            settled[node] = ("batch", batched)
        else:
            raise ValueError(
                f"The value {node.name!r} ({type(a).__name__}: {a!r} at batch size 1, {b!r} at 2) would cross "
                "the cut: it is not a tensor, not a constant and not the batch size, so the cloud part cannot "
                "receive or recompute it. Cut at another layer."
            )
    return settled


def check_tensor_payload(edge, example):
    """Raise if something other than a tensor would cross the cut (found on ``example``)."""
    with torch.no_grad():
        outs = edge(example)
    n_extra = getattr(edge, "n_extra", 0)
    outs = (outs[0], *outs[1 + n_extra :])
    for name, value in zip(["<activation>", *edge.crossing_names], outs):
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"The value {name!r} of type {type(value).__name__} would cross the cut: only "
                "tensors can be sent to the cloud. Cut at another layer."
            )


def with_classifier_input(graph_module: fx.GraphModule, classifier: str) -> fx.GraphModule:
    """A copy of ``graph_module`` that returns ``(output, features)``: its output and the input of ``classifier``.

    ``classifier`` (a dotted module name) must be the linear layer whose
    output is the graph's output, so ``features`` are the penultimate
    features that the logits are computed from (what a feature-space cloud
    score reads, :class:`~earlin_sklearn.baselines.EnergyKNNDetector`).

    Raises
    ------
    ValueError
        If the graph's output is not ``classifier``'s.
    """
    gm = copy.deepcopy(graph_module)
    output = next(node for node in gm.graph.nodes if node.op == "output")
    logits = output.args[0]
    if not (isinstance(logits, fx.Node) and logits.op == "call_module" and logits.target == classifier):
        raise ValueError(f"the cloud part's output is not the output of its layer {classifier!r}, so its "
                         "penultimate features cannot be read; feature-space cloud scores need a model whose "
                         "forward() ends with its classifier layer.")
    output.args = ((logits, logits.args[0]),)
    gm.graph.lint()
    gm.recompile()
    return gm
