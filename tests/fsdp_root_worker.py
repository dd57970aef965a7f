"""Standalone 2-process worker for ``tests/test_fsdp.py`` (never collected).

An FSDP2 model whose *root* group holds a parameter (as the embeddings and head of an LLM sharded
layer by layer do): ``ShardedLineLoss.loss_at`` must move it too, against the same losses
computed on the whole model in one process. Prints the JSON on rank 0.
"""
import copy
import json
import os
import sys

import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(5, 9)
        self.head = nn.Parameter(torch.randn(9, 3) * 0.3)   # held by the root FSDP group
    def forward(self, x):
        return torch.tanh(self.inner(x)) @ self.head

def mse(model, batch): return F.mse_loss(model(batch[0]), batch[1])

def run(rank, port):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lr_batch_callback.engine.sharded import ShardedLineLoss
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = Net().double()
    dense = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (2,))
    fully_shard(model.inner, mesh=mesh)
    fully_shard(model, mesh=mesh)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 5, generator=g, dtype=torch.float64)
    y = torch.randn(24, 3, generator=g, dtype=torch.float64)
    mine = (x[rank*12:(rank+1)*12], y[rank*12:(rank+1)*12])
    line = ShardedLineLoss(model, mse, [mine], [0.5])
    out = {}
    with line:
        grad = line.gradient()
        d = [-t for t in grad]
        out["sharded"] = [line.loss_at(d, eta) for eta in (0.0, 0.5, 1.0)]
    # dense reference: same gradient direction, full batch, one process
    gd = torch.autograd.grad(mse(dense, (x, y)), list(dense.parameters()))
    ref = []
    with torch.no_grad():
        base = [p.clone() for p in dense.parameters()]
        for eta in (0.0, 0.5, 1.0):
            for p, b, gi in zip(dense.parameters(), base, gd):
                p.copy_(b - eta * gi)
            ref.append(float(mse(dense, (x, y))))
        # the same, but with the root's `head` left at theta0 (what stale unsharded params give)
        stale = []
        for eta in (0.0, 0.5, 1.0):
            for (n, p), b, gi in zip(dense.named_parameters(), base, gd):
                p.copy_(b if n == "head" else b - eta * gi)
            stale.append(float(mse(dense, (x, y))))
    out["dense"], out["dense_head_frozen"] = ref, stale
    out["root_param_is_dtensor_after"] = type(model.head).__name__
    if rank == 0:
        print(json.dumps(out, indent=1))
    dist.destroy_process_group()

if __name__ == "__main__":
    torch.set_num_threads(1)
    mp.spawn(run, args=(int(sys.argv[1]),), nprocs=2)
