"""ONNX export of models with fused_fpn (fused_fpn/_onnx.py): torchvision's graph, torchvision's numbers.

While torch.onnx.export runs (the dynamo exporter, torch's default, and the TorchScript one), every
lateral is exported as torchvision's conv2d + F.interpolate + add; an exported program that already
holds the fused op exports with ``fused_fpn.onnx_translation_table()``. Each export is run with ONNX
Runtime and compared with the same export of torchvision's module (same nodes, the same bits) and with
torchvision's eager output.
"""
import functools
import importlib
import os
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.ops import feature_pyramid_network as tv_fpn

import fused_fpn
from fused_fpn import _onnx
from fused_fpn import backends as fb
from fpn_testing import eager_lateral
from test_fpn_module import feature_sizes, make_features, pair


def _require(name):
    """A test dependency pinned in requirements-dev.txt: missing in CI (CI=true), the import error
    fails the run; elsewhere (the GPU machines' environment has no ONNX packages) the module skips."""
    if os.environ.get("CI", "").strip().lower() == "true":
        return importlib.import_module(name)
    return pytest.importorskip(name)


onnx = _require("onnx")
ort = _require("onnxruntime")
_require("onnxscript")   # the dynamo exporter's translations

EXPORTERS = [pytest.param(True, id="dynamo"), pytest.param(False, id="torchscript")]


class Positional(nn.Module):
    """model(OrderedDict(names = tensors)) as a module of positional tensors returning a list (what an
    ONNX graph's inputs and outputs are)."""

    def __init__(self, model, names):
        super().__init__()
        self.model, self.names = model, list(names)
        # the wrapped model's mode: the TorchScript exporter puts a training-mode module in eval mode
        # for the export and back with .train(), which would put an eval-mode model into training
        self.train(model.training)

    def forward(self, *feats):
        return list(self.model(OrderedDict(zip(self.names, feats))).values())


def export(module, args, path, dynamo, **kwargs):
    """torch.onnx.export to ``path`` (the dynamo exporter's optimizer on, as by default) -> the loaded ONNX model."""
    torch.onnx.export(module, tuple(args), str(path), dynamo=dynamo, **kwargs)
    return onnx.load(str(path))


def run(path, args):
    """ONNX Runtime (CPU) outputs of the file at ``path`` for ``args``, as torch tensors."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.detach().contiguous().numpy() for i, a in zip(session.get_inputs(), args)}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


def op_types(model):
    return [(node.domain, node.op_type) for node in model.graph.node]


def assert_standard_ops_only(model):
    """Every node is an ONNX standard op (default domain): no fused_fpn op reached the file."""
    custom = [(d, t) for d, t in op_types(model) if d not in ("", "ai.onnx")]
    assert not custom, f"non-standard nodes in the ONNX graph: {custom}"
    assert not any("lateral" in t.lower() for _, t in op_types(model))


def assert_same_as_torchvision(ours_model, tv_model, ours_out, tv_out, expected):
    """The same node sequence as torchvision's export, bit-identical ONNX Runtime outputs, and those
    equal to torchvision's eager outputs within fp32 rounding."""
    assert_standard_ops_only(ours_model)
    assert [t for _, t in op_types(ours_model)] == [t for _, t in op_types(tv_model)]
    assert len(ours_out) == len(tv_out) == len(expected)
    for got, same, want in zip(ours_out, tv_out, expected):
        assert torch.equal(got, same)
        torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("variant", ["maxpool", "p6p7", "batchnorm", "groupnorm", "cpu_backend"])
def test_fpn_exports_torchvisions_graph_and_numbers(dynamo, variant, tmp_path):
    """A fused FPN exports the graph torchvision's FPN exports, with the same weights: Conv, Resize,
    Add per level, each lateral block as torchvision's (an eval-mode BatchNorm2d, which the fused path
    folds into the weights, is folded into the Conv by the exporters, for torchvision's graph as well;
    a GroupNorm is a node), whichever backend it was built with ("auto", or "cpu" asked for by name).
    fused_fpn's argument checks raise no TracerWarning under the TorchScript exporter. Odd sizes
    (33 x 47: levels 9 x 12, 5 x 6, 3 x 3, 2 x 2), two images."""
    norm = {"batchnorm": nn.BatchNorm2d, "groupnorm": functools.partial(nn.GroupNorm, 4)}.get(variant)
    backend = "cpu" if variant == "cpu_backend" else "auto"
    extra = {"p6p7": (tv_fpn.LastLevelP6P7(16, 16), fused_fpn.LastLevelP6P7(16, 16))}.get(
        variant, (tv_fpn.LastLevelMaxPool(), fused_fpn.LastLevelMaxPool()))
    tv, ours = pair(*extra, norm_layer=norm, backend=backend)
    if variant == "p6p7":   # same p6 / p7 weights on both sides
        ours.extra_blocks.load_state_dict(tv.extra_blocks.state_dict())
    tv, ours = tv.eval(), ours.eval()
    if variant == "batchnorm":
        assert fused_fpn.lateral_params(ours.inner_blocks[0]) is not None   # folded when it runs fused
    feats = make_features(2, 33, 47, torch.float32, "cpu", "nchw")
    args = list(feats.values())
    tv_model = export(Positional(tv, feats), args, tmp_path / "tv.onnx", dynamo)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours_model = export(Positional(ours, feats), args, tmp_path / "ours.onnx", dynamo)
    ours_warned = [f"{w.filename}:{w.lineno}" for w in caught   # (torch's group_norm warns for torchvision too)
                   if issubclass(w.category, torch.jit.TracerWarning) and "fused_fpn" in w.filename]
    assert not ours_warned
    if variant == "groupnorm":
        assert [t for _, t in op_types(ours_model)].count("GroupNormalization") + \
            [t for _, t in op_types(ours_model)].count("InstanceNormalization") >= 4
    with torch.no_grad():
        expected = list(tv(feats).values())
        assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-5) for a, b in zip(ours(feats).values(), expected))
    assert_same_as_torchvision(ours_model, tv_model, run(tmp_path / "ours.onnx", args),
                               run(tmp_path / "tv.onnx", args), expected)
    assert not _onnx.exporting()   # the export's flags are down again: the fused op runs again
    assert fb.select("auto", args[0]) is not _onnx


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_fpn_export_with_dynamic_sizes_runs_at_other_sizes(dynamo, tmp_path):
    """Exported with dynamic batch and spatial sizes (dynamic_shapes / dynamic_axes), the graph runs
    images of other sizes, 3 x 65 x 31 after 2 x 33 x 47, as torchvision's does (the Resize sizes
    come from the maps' shapes, not from constants)."""
    tv, ours = pair(tv_fpn.LastLevelMaxPool(), fused_fpn.LastLevelMaxPool())
    tv, ours = tv.eval(), ours.eval()
    feats = make_features(2, 33, 47, torch.float32, "cpu", "nchw")
    names = list(feats)
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=16)
        dims = tuple({0: batch, 2: torch.export.Dim(f"h{i}", min=2, max=512),
                      3: torch.export.Dim(f"w{i}", min=2, max=512)} for i in range(len(names)))
        kwargs = dict(dynamic_shapes=(dims,))   # the one *feats argument
    else:
        kwargs = dict(input_names=names, dynamic_axes={n: {0: "batch", 2: f"h_{n}", 3: f"w_{n}"} for n in names})
    tv_model = export(Positional(tv, names), feats.values(), tmp_path / "tv.onnx", dynamo, **kwargs)
    ours_model = export(Positional(ours, names), feats.values(), tmp_path / "ours.onnx", dynamo, **kwargs)
    other = make_features(3, 65, 31, torch.float32, "cpu", "nchw", seed=1)
    assert [tuple(t.shape[2:]) for t in other.values()] == feature_sizes(65, 31) != feature_sizes(33, 47)
    with torch.no_grad():
        expected = list(tv(other).values())
    args = list(other.values())
    assert_same_as_torchvision(ours_model, tv_model, run(tmp_path / "ours.onnx", args),
                               run(tmp_path / "tv.onnx", args), expected)


class Lateral(nn.Module):
    """fused_fpn.lateral(x, W, b, top) as a module (weight [Cout, Cin, 1, 1], as a conv's)."""

    def __init__(self, cin, cout, bias, backend="auto"):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.weight = nn.Parameter(torch.randn(cout, cin, 1, 1, generator=g) * 0.3)
        self.bias = nn.Parameter(torch.randn(cout, generator=g)) if bias else None
        self.backend = backend

    def forward(self, x, top=None):
        return fused_fpn.lateral(x, self.weight, self.bias, top, backend=self.backend)


class TorchvisionLateral(nn.Module):
    """torchvision's computation of what ``lateral`` (a Lateral) computes: conv2d + nearest interpolate + add."""

    def __init__(self, lateral):
        super().__init__()
        self.weight, self.bias = lateral.weight, lateral.bias

    def forward(self, x, top=None):
        return eager_lateral(x, self.weight, self.bias, top)


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("case", ["upsample", "downsample", "no_top", "no_bias"])
def test_lateral_function_exports_as_conv_resize_add(dynamo, case, tmp_path):
    """fused_fpn.lateral inside a user's module: Conv (+ Resize + Add), the nodes and ONNX Runtime
    outputs of torchvision's expression exported the same way; a top larger than x (nearest
    downsampling) as well. x channels_last, 2 x 5 x 7 x 9."""
    g = torch.Generator().manual_seed(0)
    module = Lateral(5, 6, bias=case != "no_bias").eval()
    x = torch.randn(2, 5, 7, 9, generator=g).contiguous(memory_format=torch.channels_last)
    top = {"upsample": (4, 5), "downsample": (11, 13), "no_bias": (3, 3)}.get(case)
    args = [x] if top is None else [x, torch.randn(2, 6, *top, generator=g)]
    model = export(module, args, tmp_path / "lateral.onnx", dynamo)
    assert_standard_ops_only(model)
    kinds = [t for _, t in op_types(model)]
    assert kinds.count("Conv") == 1 and kinds.count("Resize") == kinds.count("Add") == (top is not None)
    tv_model = export(TorchvisionLateral(module).eval(), args, tmp_path / "tv.onnx", dynamo)
    with torch.no_grad():
        expected = eager_lateral(args[0], module.weight, module.bias, *args[1:])
        torch.testing.assert_close(module(*args), expected, atol=1e-5, rtol=1e-5)
    assert_same_as_torchvision(model, tv_model, run(tmp_path / "lateral.onnx", args), run(tmp_path / "tv.onnx", args),
                               [expected])


def test_exported_program_with_the_fused_op_exports_with_the_translation_table(tmp_path):
    """A torch.export program holds the fused op (fused_fpn::lateral); the ONNX exporter has no
    translation of its own for it (its error names the op), and with
    ``fused_fpn.onnx_translation_table()`` it writes the nodes torchvision's FPN exports (Resize with
    torchvision's attributes), with the same ONNX Runtime outputs."""
    tv, ours = pair(tv_fpn.LastLevelMaxPool(), fused_fpn.LastLevelMaxPool(), backend="cpu")
    tv, ours = tv.eval(), ours.eval()
    feats = make_features(1, 33, 47, torch.float32, "cpu", "nchw")
    args = list(feats.values())
    program = torch.export.export(Positional(ours, feats), tuple(args))
    assert any(node.target is torch.ops.fused_fpn.lateral.default for node in program.graph.nodes)
    with pytest.raises(Exception, match="fused_fpn.lateral"):
        torch.onnx.export(program, dynamo=True)
    table = fused_fpn.onnx_translation_table()
    assert table[torch.ops.fused_fpn.lateral.default] is _onnx._lateral_translation
    torch.onnx.export(program, dynamo=True, custom_translation_table=table).save(str(tmp_path / "ours.onnx"))
    tv_model = export(Positional(tv, feats), args, tmp_path / "tv.onnx", True)
    with torch.no_grad():
        expected = list(tv(feats).values())
    ours_model = onnx.load(str(tmp_path / "ours.onnx"))
    assert_same_as_torchvision(ours_model, tv_model, run(tmp_path / "ours.onnx", args),
                               run(tmp_path / "tv.onnx", args), expected)

    def resize_attributes(model):
        return [sorted((a.name, onnx.helper.get_attribute_value(a)) for a in n.attribute
                       if a.name in ("mode", "coordinate_transformation_mode", "nearest_mode"))
                for n in model.graph.node if n.op_type == "Resize"]
    assert resize_attributes(ours_model) == resize_attributes(tv_model)
    assert resize_attributes(ours_model)[0] == [("coordinate_transformation_mode", b"asymmetric"),
                                                ("mode", b"nearest"), ("nearest_mode", b"floor")]


def test_translation_table_takes_the_triton_op_too(tmp_path):
    """The triton backend's op (here the interpreter's custom op, registered on CPU under
    TRITON_INTERPRET=1; on a GPU a triton_op, not exported by any run so far) has the same translation."""
    if "triton" not in fused_fpn.available_backends("cpu"):
        pytest.skip("the triton backend's op is registered on CPU only under TRITON_INTERPRET=1 with triton")
    table = fused_fpn.onnx_translation_table()
    module = Lateral(5, 6, bias=True, backend="triton").eval()
    g = torch.Generator().manual_seed(1)
    x, top = torch.randn(1, 5, 7, 9, generator=g), torch.randn(1, 6, 4, 5, generator=g)
    program = torch.export.export(module, (x, top))
    assert any(node.target is torch.ops.fused_fpn.triton_lateral.default for node in program.graph.nodes)
    assert table[torch.ops.fused_fpn.triton_lateral.default] is _onnx._lateral_translation
    torch.onnx.export(program, dynamo=True, custom_translation_table=table).save(str(tmp_path / "triton.onnx"))
    with torch.no_grad():
        expected = eager_lateral(x, module.weight, module.bias, top)
    (got,) = run(tmp_path / "triton.onnx", [x, top])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_exporting_is_only_true_during_onnx_export(tmp_path):
    """The flag is up while torch.onnx.export runs (either exporter), and only then: not under
    torch.export.export (whose programs keep the fused op, tests/test_training_and_compilers.py),
    torch.jit.trace or torch.compile (read there without a graph break); an unknown backend name is
    still an error while exporting."""
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(_onnx.exporting())
            with pytest.raises(ValueError, match="unknown fused_fpn backend"):
                fb.select("no-such-backend", x)
            return fused_fpn.lateral(x, torch.ones(2, 3))

    def flags_during(fn):
        seen.clear()
        fn()
        return set(seen)

    x = torch.randn(1, 3, 4, 4)
    assert flags_during(lambda: torch.export.export(Probe(), (x,))) == {False}
    assert flags_during(lambda: torch.jit.trace(Probe(), (x,))) == {False}
    for dynamo in (False, True):
        path = str(tmp_path / f"probe_{dynamo}.onnx")
        assert flags_during(lambda: torch.onnx.export(Probe().eval(), (x,), path, dynamo=dynamo)) == {True}
    assert not _onnx.exporting()
    compiled = torch.compile(lambda t: t + 1 if _onnx.exporting() else t - 1, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), x - 1)


def test_strict_export_inside_the_onnx_exporter_takes_the_unfused_ops(monkeypatch):
    """The dynamo exporter tries torch.export.export(strict=False) first and strict=True when that
    fails; the strict one traces with torch.compile's tracer, which reads the exporter's flag (not
    torch.onnx.is_in_onnx_export, a constant False there): the program then has torchvision's ops,
    and without the flag, the next strict export has the fused op again."""
    from torch.onnx._internal.exporter import _flags

    class M(nn.Module):
        def forward(self, x, top):
            return fused_fpn.lateral(x, torch.ones(2, 3), None, top)

    x, top = torch.randn(1, 3, 4, 4), torch.randn(1, 2, 2, 2)

    def targets():
        program = torch.export.export(M(), (x, top), strict=True)
        return [str(n.target) for n in program.graph.nodes if n.op == "call_function"]

    with monkeypatch.context() as patch:
        patch.setattr(_flags, "_is_onnx_exporting", True)
        during = targets()
    assert "aten.conv2d.default" in during and "aten.upsample_nearest2d.vec" in during
    assert not any("fused_fpn" in t for t in during)
    assert any("fused_fpn.lateral" in t for t in targets())


@pytest.mark.slow   # a ResNet-18 backbone, two exporters: about 20 s on 2 CPU cores
@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_converted_detector_backbone_exports_as_torchvisions(dynamo, tmp_path):
    """torchvision's ResNet-18 FPN backbone (FrozenBatchNorm2d, LastLevelMaxPool), converted with
    fused_fpn.convert: its ONNX graph and ONNX Runtime outputs are those of the unconverted backbone."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(0)
    tv = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5).eval()
    ours = fused_fpn.convert(resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)).eval()
    ours.load_state_dict(tv.state_dict())
    assert isinstance(ours.fpn, fused_fpn.FPN) and not isinstance(tv.fpn, fused_fpn.FPN)
    image = torch.rand(1, 3, 97, 131)

    class Outputs(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m
            self.train(m.training)   # as Positional

        def forward(self, x):
            return list(self.m(x).values())

    tv_model = export(Outputs(tv), [image], tmp_path / "tv.onnx", dynamo)
    ours_model = export(Outputs(ours), [image], tmp_path / "ours.onnx", dynamo)
    with torch.no_grad():
        expected = list(tv(image).values())
    assert_same_as_torchvision(ours_model, tv_model, run(tmp_path / "ours.onnx", [image]),
                               run(tmp_path / "tv.onnx", [image]), expected)


@pytest.mark.slow   # two detector exports: about 8 s on 2 CPU cores
def test_converted_detector_exports_torchvisions_graph(tmp_path):
    """A whole converted detector, fasterrcnn_mobilenet_v3_large_320_fpn, exported with the TorchScript
    exporter (torchvision's own ONNX path for its detectors; the dynamo exporter fails on the
    unconverted detector as well): the same 1500-odd nodes as the unconverted detector's export, and
    bit-identical ONNX Runtime detections (score threshold 0, so that random weights give 100 boxes)."""
    import torchvision

    def detector():
        torch.manual_seed(0)
        return torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
            weights=None, weights_backbone=None, box_score_thresh=0.0).eval()

    tv, ours = detector(), fused_fpn.convert(detector())
    assert isinstance(ours.backbone.fpn, fused_fpn.FPN)
    image = [torch.rand(3, 300, 400, generator=torch.Generator().manual_seed(1))]
    outputs, nodes = {}, {}
    for name, model in (("tv", tv), ("ours", ours)):
        path = tmp_path / f"{name}.onnx"
        nodes[name] = [t for _, t in op_types(export(model, [image], path, dynamo=False, opset_version=17))]
        outputs[name] = run(path, image)
    assert nodes["ours"] == nodes["tv"] and nodes["ours"].count("Resize") >= 2
    assert outputs["ours"][0].shape == (100, 4)
    assert all(torch.equal(a, b) for a, b in zip(outputs["ours"], outputs["tv"]))
