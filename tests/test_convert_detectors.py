"""fused_fpn.convert on torchvision's own detectors (weights=None: nothing is downloaded):
in-place swap with shared parameters, eval detections and train losses/gradients match."""
import copy

import pytest
import torch
from torchvision.models import detection
from torchvision.ops import FeaturePyramidNetwork

import fused_fpn

SMALL = dict(weights=None, weights_backbone=None, min_size=96, max_size=144)
BUILDERS = {
    "fasterrcnn_resnet50_fpn": lambda: detection.fasterrcnn_resnet50_fpn(**SMALL),
    "fasterrcnn_resnet50_fpn_v2": lambda: detection.fasterrcnn_resnet50_fpn_v2(**SMALL),
    "maskrcnn_resnet50_fpn": lambda: detection.maskrcnn_resnet50_fpn(**SMALL),
    "keypointrcnn_resnet50_fpn": lambda: detection.keypointrcnn_resnet50_fpn(**SMALL),
    "retinanet_resnet50_fpn": lambda: detection.retinanet_resnet50_fpn(**SMALL),
    "retinanet_resnet50_fpn_v2": lambda: detection.retinanet_resnet50_fpn_v2(**SMALL),
    "fcos_resnet50_fpn": lambda: detection.fcos_resnet50_fpn(**SMALL),
    "fasterrcnn_mobilenet_v3_large_fpn": lambda: detection.fasterrcnn_mobilenet_v3_large_fpn(**SMALL),
}


def images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand((3, 171, 203), generator=g), torch.rand((3, 149, 217), generator=g)]


def targets(name, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in [(171, 203), (149, 217)]:
        xy = torch.rand((3, 2), generator=g) * torch.tensor([w / 2, h / 2])
        wh = torch.rand((3, 2), generator=g) * torch.tensor([w / 2, h / 2]) + 8
        boxes = torch.cat([xy, xy + wh], dim=1)
        num_classes = 2 if name.startswith("keypointrcnn") else 5
        t = {"boxes": boxes, "labels": torch.randint(1, num_classes, (3,), generator=g)}
        if name.startswith("maskrcnn"):
            t["masks"] = (torch.rand((3, h, w), generator=g) > 0.5).to(torch.uint8)
        if name.startswith("keypointrcnn"):
            kp = torch.rand((3, 17, 2), generator=g) * wh[:, None, :] + xy[:, None, :]
            t["keypoints"] = torch.cat([kp, torch.ones((3, 17, 1))], dim=2)
        out.append(t)
    return out


def fpn_modules(model):
    return [m for m in model.modules() if isinstance(m, FeaturePyramidNetwork)]


@pytest.fixture(scope="module", params=list(BUILDERS))
def model_pair(request):
    torch.manual_seed(0)
    reference = BUILDERS[request.param]()
    converted = copy.deepcopy(reference)
    return request.param, reference, converted


def test_convert_swaps_in_place_and_shares_parameters(model_pair):
    name, reference, converted = model_pair
    before = {n: p for n, p in converted.named_parameters()}
    buffers = {n: b for n, b in converted.named_buffers()}
    old = fpn_modules(converted)
    assert old and not any(isinstance(m, fused_fpn.FPN) for m in old)
    assert fused_fpn.convert(converted) is converted
    new = fpn_modules(converted)
    assert len(new) == len(old) and all(isinstance(m, fused_fpn.FPN) for m in new)
    after = dict(converted.named_parameters())
    assert list(after) == list(before)                         # count and order kept
    assert all(after[n] is before[n] for n in before)          # the very same tensors
    assert all(b is buffers[n] for n, b in converted.named_buffers())
    for o, n in zip(old, new):
        assert n.extra_blocks is o.extra_blocks and n.inner_blocks is o.inner_blocks
        assert n.training == o.training
    fused_fpn.convert(converted)                               # idempotent
    assert fpn_modules(converted) == new


def _assert_detections_close(got, expected):
    for g, e in zip(got, expected):
        assert g.keys() == e.keys()
        for k in e:
            assert g[k].shape == e[k].shape, k
            if e[k].dtype.is_floating_point:
                torch.testing.assert_close(g[k], e[k], atol=2e-3, rtol=1e-3, msg=k)
            else:
                assert torch.equal(g[k], e[k]), k


def test_eval_detections_match(model_pair):
    name, reference, converted = model_pair
    fused_fpn.convert(converted)
    reference.eval(), converted.eval()
    with torch.no_grad():
        _assert_detections_close(converted(images()), reference(images()))


def test_train_losses_and_gradients_match(model_pair):
    """In float64: a detector's training step is chaotic (proposal sampling, IoU thresholds), so
    fp32 rounding differences of 1e-7 can grow to 1e-3 in some gradients; in float64 both
    models must agree to 1e-6 on every loss and every parameter gradient."""
    name, reference, converted = model_pair
    reference, converted = copy.deepcopy(reference).double(), copy.deepcopy(converted).double()
    fused_fpn.convert(converted)
    reference.train(), converted.train()
    losses = []
    for model in (reference, converted):
        model.zero_grad()
        torch.manual_seed(7)                 # the samplers draw random proposals
        # (torchvision insists on float32 keypoints, even in a float64 model)
        tgts = [{k: (v.double() if v.dtype.is_floating_point and k != "keypoints" else v) for k, v in t.items()}
                for t in targets(name)]
        loss_dict = model([im.double() for im in images()], tgts)
        sum(loss_dict.values()).backward()
        losses.append(loss_dict)
    assert losses[0].keys() == losses[1].keys()
    for k in losses[0]:
        torch.testing.assert_close(losses[1][k], losses[0][k], atol=1e-9, rtol=1e-7, msg=k)
    for (n, p_ref), (_, p_ours) in zip(reference.named_parameters(), converted.named_parameters()):
        if p_ref.grad is None:
            assert p_ours.grad is None, n
            continue
        # some gradients are exactly zero up to float64 noise (1e-17): the 1e-12 floor covers those
        scale = p_ref.grad.abs().max().item()
        torch.testing.assert_close(p_ours.grad, p_ref.grad, atol=1e-6 * scale + 1e-12, rtol=1e-6, msg=n)
