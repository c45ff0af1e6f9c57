# NCCL point-to-point GPU0 -> GPU1 over NCCL's socket transport: the baseline of docs/PERFORMANCE.md
# ("Two GPUs"). Run one process per GPU, e.g.:
#   for r in 0 1; do RANK=$r NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_IB_DISABLE=1 \
#     NCCL_NET=Socket NCCL_SOCKET_IFNAME=lo python3 tools/bench/nccl_socket_p2p.py & done; wait
# Sends are queued back to back and timed to the last one's completion.
import os, time, torch, torch.distributed as dist
rank = int(os.environ["RANK"])
torch.cuda.set_device(rank)
dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29511", rank=rank, world_size=2)
for size in [4096, 1 << 20, 16 << 20, 64 << 20]:
    buf = torch.empty(size, dtype=torch.uint8, device="cuda")
    iters = 20 if size >= (16 << 20) else 200
    for i in range(iters + 5):
        if i == 5:
            torch.cuda.synchronize(); dist.barrier(); t = time.perf_counter()
        if rank == 0:
            dist.send(buf, 1)
        else:
            dist.recv(buf, 0)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    if rank == 1:
        print(f"nccl socket GPU0->GPU1 {size} B: {size * iters / dt / 1e9:.3f} GB/s, {dt / iters * 1e6:.1f} us/iter", flush=True)
dist.destroy_process_group()
