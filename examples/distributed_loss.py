"""The distributed CLIP loss under torchrun: prints the loss and the time per step.

    torchrun --nproc_per_node=2 examples/distributed_loss.py                        # CPU, gloo
    torchrun --nproc_per_node=2 examples/distributed_loss.py --mode ring --check    # + open_clip check
    torchrun --nproc_per_node=8 examples/distributed_loss.py --mode ring --n-local 16384 --dim 1024 --dtype bf16

On a machine with CUDA each rank uses GPU ``LOCAL_RANK`` and the nccl backend; otherwise the
CPU and gloo.  ``--mode gather`` is open_clip's semantics (``--local-loss``,
``--gather-with-grad`` as in open_clip); ``--mode ring`` computes the
``local_loss=True, gather_with_grad=True`` loss with O(N_local * D) memory per rank.
``--check`` also runs open_clip's ``ClipLoss`` on the same shards and prints the largest
difference in the loss and the feature gradients (equal shard sizes, as open_clip needs).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from clip_fast import FastClipLoss

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", default="gather", choices=["gather", "ring"])
    p.add_argument("--n-local", type=int, default=1024, help="rows per rank")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension D")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--local-loss", action="store_true")
    p.add_argument("--gather-with-grad", action="store_true")
    p.add_argument("--backend", default="auto")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--check", action="store_true", help="compare with open_clip's ClipLoss")
    args = p.parse_args()
    if args.mode == "ring":  # the semantics ring mode computes
        args.local_loss = args.gather_with_grad = True

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")

    gen = torch.Generator(device="cpu").manual_seed(1000 + rank)
    img = F.normalize(torch.randn(args.n_local, args.dim, generator=gen), dim=1)
    txt = F.normalize(torch.randn(args.n_local, args.dim, generator=gen) + 0.3 * img, dim=1)
    img = img.to(device, DTYPES[args.dtype]).requires_grad_(True)
    txt = txt.to(device, DTYPES[args.dtype]).requires_grad_(True)
    logit_scale = torch.nn.Parameter(torch.tensor(1 / 0.07, device=device).log())

    loss_fn = FastClipLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad, rank=rank,
                           world_size=world_size, backend=args.backend, distributed=args.mode)

    def step():
        img.grad = txt.grad = logit_scale.grad = None
        loss = loss_fn(img, txt, logit_scale.exp())
        loss.backward()
        return loss

    for _ in range(args.warmup):
        step()
    if use_cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        dist.barrier()
        if use_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step()
        if use_cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)

    losses = [torch.zeros((), device=device) for _ in range(world_size)]
    dist.all_gather(losses, loss.detach().float())
    # The slowest rank sets the step time.
    slowest = torch.tensor(statistics.median(times), device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    peak = torch.cuda.max_memory_allocated() / 2**20 if use_cuda else float("nan")
    if rank == 0:
        where = torch.cuda.get_device_name() if use_cuda else "CPU"
        print(f"clip_fast {args.mode} (local_loss={args.local_loss}, gather_with_grad={args.gather_with_grad}) "
              f"on {world_size} x {where} [{dist.get_backend()}], {args.dtype}, "
              f"N_local={args.n_local}, N_global={args.n_local * world_size}, D={args.dim}")
        print("loss per rank: " + ", ".join(f"{x.item():.6f}" for x in losses))
        print(f"forward+backward: median {slowest.item():.2f} ms over {args.steps} steps (slowest rank)"
              + (f", peak allocated {peak:.1f} MiB on rank 0" if use_cuda else ""))

    if args.check:
        from open_clip.loss import ClipLoss

        ours = (loss.detach().double(), img.grad.double(), txt.grad.double())
        oimg = img.detach().clone().requires_grad_(True)
        otxt = txt.detach().clone().requires_grad_(True)
        ref = ClipLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad, rank=rank,
                       world_size=world_size)(oimg, otxt, logit_scale.exp().detach())
        ref.backward()
        diff = torch.stack([(a - b).abs().max() for a, b in zip(ours, (ref.double(), oimg.grad.double(),
                                                                         otxt.grad.double()))])
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        if rank == 0:
            print(f"max |clip_fast - open_clip| over ranks: loss {diff[0]:.3e}, d_img {diff[1]:.3e}, "
                  f"d_txt {diff[2]:.3e}")
    dist.barrier()  # let every rank finish its last collective before the group goes
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
