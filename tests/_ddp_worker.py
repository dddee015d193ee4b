"""Run by tests/test_nn.py::test_ddp_gradients_equal_single_process in each of 2 processes."""

import os
import sys

import torch
import torch.distributed as dist


def model():
    import tilesmith

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5))
    return tilesmith.nn.convert(net, backend=os.environ["TILESMITH_TEST_BACKEND"])


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)


def gradients(net, x, y):
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    return [p.grad.clone() for p in net.parameters()]


def main():
    rank, world, out, rendezvous = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    # A file rendezvous: no TCP port to pick (and race for) on a shared machine.
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world)
    x, y = data()
    shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    net = torch.nn.parallel.DistributedDataParallel(model())
    grads = gradients(net, x[shard], y[shard])
    if rank == 0:
        torch.save(grads, out)
    # Both ranks past their last collective before either tears gloo down: without it a rank
    # that exits first aborted the other ~1 run in 4 ("terminate called without an active
    # exception").
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
