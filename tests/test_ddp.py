"""DDP and FSDP2 on CPU (gloo, loopback only): a converted model trained in 2 processes stays identical
across ranks and equals a single-process run on the same global batch (DDP), or torchvision's model
trained the same way (FSDP2, fully_shard: the FPN's parameters sharded across the ranks)."""
import contextlib
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops import feature_pyramid_network as tv_fpn

import fused_fpn

STEPS = 3
CHANNELS = [4, 8, 12]


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fpn = FeaturePyramidNetwork(CHANNELS, 8, extra_blocks=tv_fpn.LastLevelMaxPool())
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, feats):
        return sum(self.head(v).square().mean() for v in self.fpn(feats).values())


def global_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return {f"c{i}": torch.randn((4, c, 24 // 2 ** i, 20 // 2 ** i), generator=g) for i, c in enumerate(CHANNELS)}


def train(model, rank, world):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(STEPS):
        feats = {k: v.chunk(world)[rank] for k, v in global_batch(step).items()}
        opt.zero_grad()
        model(feats).backward()
        opt.step()


@contextlib.contextmanager
def process_group(rank, world, port):
    """This spawned process as ``rank`` of a gloo group of ``world`` on loopback, one CPU thread.

    When the body succeeds, the process ends here with ``os._exit(0)``, skipping interpreter
    finalization. With torch 2.11 a gloo worker thread can still be releasing a finished all-gather's
    tensors when the interpreter finalizes; it then needs the GIL, and the process aborts ("terminate
    called without an active exception", from ``~AsyncAllgatherCoalescedWork`` in
    ``ProcessGroupGloo::runLoop``; 3 in 60 FSDP2 runs on torchvision's own model, 0 in 60 with this
    exit). Everything the test reads was written before; a failing body still raises."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def assert_trained_alike(got, want):
    """State dict ``got`` equals ``want`` (1e-6), and every weight of ``want`` moved from Model()'s."""
    initial = Model().state_dict()
    assert list(got) == list(want) == list(initial)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=1e-5, msg=k)
        if k.endswith("weight"):
            assert not torch.equal(v, initial[k]), f"{k} did not train"


def worker(rank, world, port, out_dir):
    with process_group(rank, world, port):
        model = fused_fpn.convert(Model())
        assert isinstance(model.fpn, fused_fpn.FPN)
        ddp = nn.parallel.DistributedDataParallel(model)
        train(ddp, rank, world)
        torch.save({k: v.detach() for k, v in model.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="gloo not available")
def test_ddp_two_processes_match_single_process(tmp_path):
    mp.start_processes(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    single = fused_fpn.convert(Model())
    train(single, 0, 1)
    for k in single.state_dict():
        assert torch.equal(rank0[k], rank1[k]), f"ranks diverged on {k}"
    assert_trained_alike(rank0, single.state_dict())


def fsdp2_worker(rank, world, port, out_dir, fused):
    """Model (converted with fused_fpn when ``fused``) with fully_shard on its FPN and on the whole,
    trained on this rank's half of each global batch; rank 0 saves the gathered state_dict."""
    from torch.distributed.fsdp import fully_shard

    with process_group(rank, world, port):
        model = fused_fpn.convert(Model()) if fused else Model()
        assert isinstance(model.fpn, fused_fpn.FPN) == fused
        fully_shard(model.fpn)
        fully_shard(model)
        assert any(type(p).__name__ == "DTensor" for p in model.fpn.parameters())   # sharded between steps
        train(model, rank, world)
        state = {k: v.full_tensor().detach() for k, v in model.state_dict().items()}
        if rank == 0:
            torch.save(state, os.path.join(out_dir, f"fsdp2_{'fused' if fused else 'torchvision'}.pt"))


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="gloo not available")
def test_fsdp2_training_matches_torchvision(tmp_path):
    """FSDP2 (fully_shard) all-gathers the FPN's parameters before its forward and reduce-scatters the
    gradients after its backward; the fused op reads the gathered weights. Trained so, the converted
    model ends where torchvision's does."""
    for fused in (False, True):
        mp.start_processes(fsdp2_worker, args=(2, free_port(), str(tmp_path), fused), nprocs=2, join=True,
                           start_method="spawn")
    assert_trained_alike(torch.load(tmp_path / "fsdp2_fused.pt"), torch.load(tmp_path / "fsdp2_torchvision.pt"))
