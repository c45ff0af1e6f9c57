#!/usr/bin/env python3
"""KV-cache blocks between two NIXL agents over the TCPX backend, as inference servers move them.

Two processes: a prefill agent that holds KV blocks and a decode agent that needs them.
  1. Pull, as vLLM's NIXL connector does: the decode agent READs the prefill agent's blocks (in a
     scattered order, thousands of descriptors) with a notification that tells the prefill agent
     it may reuse them; the prefill agent waits for that notification, the decode agent checks
     every byte.
  2. Push, as SGLang does: the prefill agent WRITEs new blocks into the decode agent's memory with
     a notification; the decode agent waits for it and checks every byte.
Agents are created the way those frameworks create them: nixl_agent_config(backends=["TCPX"]),
so the backend gets no parameters and every setting comes from TCPX_P2P_* environment variables.

Usage: kv_transfer.py [--mem dram|vram] [--blocks N] [--block-size BYTES]
VRAM is allocated with the CUDA runtime through ctypes (GPU 0 of each process).
Needs NIXL's Python bindings (PYTHONPATH) and the TCPX plugin (NIXL_PLUGIN_DIR). Exit status:
0 every byte verified, 1 a failure, 77 skipped (what is missing is printed).
"""

import argparse
import multiprocessing as mp
import os
import sys
import time

SKIP = 77


def pattern(seed, nbytes):
    """Deterministic bytes for block `seed`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, nbytes, dtype=np.uint8)


def cuda_runtime():
    """The CUDA runtime through ctypes (no torch needed), or None with no runtime or no GPU."""
    import ctypes

    for name in ("libcudart.so", "libcudart.so.13", "libcudart.so.12"):
        try:
            rt = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if rt.cudaGetDeviceCount(ctypes.byref(count)) == 0 and count.value > 0:
            return rt
        return None
    return None


class Buffer:
    """Host memory (numpy) or, with --mem vram, memory of GPU 0 (cudaMalloc)."""

    H2D, D2H = 1, 2  # cudaMemcpyKind

    def __init__(self, mem, nbytes):
        import ctypes

        import numpy as np

        self.mem = mem
        self.dev = 0
        if mem == "vram":
            self.rt = cuda_runtime()
            ptr = ctypes.c_void_p()
            if self.rt.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(nbytes)) != 0:
                raise RuntimeError(f"cudaMalloc of {nbytes} bytes failed")
            self.addr = ptr.value
            self.rt.cudaMemset(ctypes.c_void_p(self.addr), 0, ctypes.c_size_t(nbytes))
        else:
            self.array = np.zeros(nbytes, dtype=np.uint8)
            self.addr = self.array.ctypes.data

    def _copy(self, dst, src, nbytes, kind):
        import ctypes

        if self.rt.cudaMemcpy(ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes), kind) != 0:
            raise RuntimeError("cudaMemcpy failed")

    def write(self, offset, data):
        if self.mem == "vram":
            self._copy(self.addr + offset, data.ctypes.data, len(data), self.H2D)
        else:
            self.array[offset : offset + len(data)] = data

    def read(self, offset, nbytes):
        import numpy as np

        if self.mem == "vram":
            out = np.empty(nbytes, dtype=np.uint8)
            self._copy(out.ctypes.data, self.addr + offset, nbytes, self.D2H)
            return out
        return self.array[offset : offset + nbytes]

    def nixl_type(self):
        return "VRAM" if self.mem == "vram" else "DRAM"


def make_agent(name):
    from nixl._api import nixl_agent, nixl_agent_config

    return nixl_agent(name, nixl_agent_config(backends=["TCPX"]))


def run_xfer(agent, op, local, remote, mem_type, peer, notif, timeout=60.0):
    """One transfer of (address, length, device) lists with a notification, as the frameworks
    post them: create, post, poll until done, release."""
    handle = agent.initialize_xfer(
        op,
        agent.get_xfer_descs(local, mem_type),
        agent.get_xfer_descs(remote, mem_type),
        peer,
        notif,
    )
    deadline = time.monotonic() + timeout
    state = agent.transfer(handle)
    while state == "PROC" and time.monotonic() < deadline:
        state = agent.check_xfer_state(handle)
    agent.release_xfer_handle(handle)
    if state != "DONE":
        raise RuntimeError(f"{op} of {len(local)} descriptors ended in state {state}")


def wait_notif(agent, sender, expected, timeout=60.0):
    # add_remote_agent() names the peer in bytes; notifications are keyed by its name as str.
    name = sender.decode() if isinstance(sender, bytes) else sender
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for message in agent.get_new_notifs().get(name, []):
            if message == expected:
                return
            raise RuntimeError(f"unexpected notification {message!r} from {sender}")
        time.sleep(0.001)
    raise RuntimeError(f"no notification {expected!r} from {sender} within {timeout} s")


def prefill(conn, args):
    """Holds KV blocks; serves the decode agent's READ, then pushes new blocks to it."""
    try:
        agent = make_agent("prefill")
        nbytes = args.blocks * args.block_size
        kv = Buffer(args.mem, nbytes)
        for b in range(args.blocks):
            kv.write(b * args.block_size, pattern(b, args.block_size))
        agent.register_memory([(kv.addr, nbytes, kv.dev, "")], kv.nixl_type())
        conn.send((agent.get_agent_metadata(), kv.addr))
        decode_md, decode_addr = conn.recv()
        decode = agent.add_remote_agent(decode_md)

        # 1. The decode agent pulls; its notification says the blocks may be reused.
        wait_notif(agent, decode, b"pulled")

        # 2. Push: block b of ours (new contents) goes to slot b of the decode agent's second half
        # (the first half took the pulled blocks, which the decode agent may still be reading).
        for b in range(args.blocks):
            kv.write(b * args.block_size, pattern(10_000 + b, args.block_size))
        local = [(kv.addr + b * args.block_size, args.block_size, kv.dev) for b in range(args.blocks)]
        remote = [
            (decode_addr + nbytes + b * args.block_size, args.block_size, 0)
            for b in range(args.blocks)
        ]
        run_xfer(agent, "WRITE", local, remote, kv.nixl_type(), decode, b"pushed")
        conn.send(conn.recv())  # wait for the decode agent's verdict, then echo it
    except Exception as error:  # reported to the parent, which fails the run
        conn.send(("error", f"prefill: {error}"))


def decode(args):
    """Pulls the prefill agent's blocks, then receives pushed ones; checks every byte."""
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=prefill, args=(child, args))
    proc.start()
    try:
        agent = make_agent("decode")
        nbytes = args.blocks * args.block_size
        kv = Buffer(args.mem, 2 * nbytes)  # pulled blocks, then pushed blocks
        agent.register_memory([(kv.addr, 2 * nbytes, kv.dev, "")], kv.nixl_type())
        message = parent.recv()
        if message[0] == "error":
            raise RuntimeError(message[1])
        prefill_md, prefill_addr = message
        peer = agent.add_remote_agent(prefill_md)
        parent.send((agent.get_agent_metadata(), kv.addr))

        # 1. Pull, vLLM style: our slot i takes the prefill agent's block (blocks - 1 - i).
        n = args.blocks
        local = [(kv.addr + i * args.block_size, args.block_size, kv.dev) for i in range(n)]
        remote = [
            (prefill_addr + (n - 1 - i) * args.block_size, args.block_size, 0) for i in range(n)
        ]
        start = time.monotonic()
        run_xfer(agent, "READ", local, remote, kv.nixl_type(), peer, b"pulled")
        took = time.monotonic() - start
        for i in range(n):
            got = kv.read(i * args.block_size, args.block_size)
            if not (got == pattern(n - 1 - i, args.block_size)).all():
                raise RuntimeError(f"pull: slot {i} does not hold block {n - 1 - i}")
        print(f"pull: {n} x {args.block_size} B READ ({args.mem}) verified, {nbytes / took / 1e9:.2f} GB/s")

        # 2. Push, SGLang style: wait for the prefill agent's notification, then check.
        wait_notif(agent, peer, b"pushed")
        for b in range(n):
            got = kv.read(nbytes + b * args.block_size, args.block_size)
            if not (got == pattern(10_000 + b, args.block_size)).all():
                raise RuntimeError(f"push: slot {b} does not hold the pushed block")
        print(f"push: {n} x {args.block_size} B WRITE ({args.mem}) with notification verified")
        parent.send(("ok", ""))
        verdict = parent.recv()
        if verdict[0] != "ok":
            raise RuntimeError(verdict[1])
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mem", choices=["dram", "vram"], default="dram")
    parser.add_argument("--blocks", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=16384)
    args = parser.parse_args()
    try:
        import numpy  # noqa: F401  (NIXL's Python API needs it)
        from nixl._api import nixl_agent  # noqa: F401
    except ImportError as error:
        print(f"SKIPPED: NIXL's Python bindings are not importable ({error}); set PYTHONPATH")
        return SKIP
    plugin_dir = os.environ.get("NIXL_PLUGIN_DIR", "")
    if not plugin_dir or not os.path.exists(os.path.join(plugin_dir, "libplugin_TCPX.so")):
        print(f"SKIPPED: no libplugin_TCPX.so in NIXL_PLUGIN_DIR ('{plugin_dir}')")
        return SKIP
    if args.mem == "vram" and cuda_runtime() is None:
        print("SKIPPED: VRAM needs the CUDA runtime (libcudart.so) and a GPU")
        return SKIP
    try:
        return decode(args)
    except Exception as error:
        print(f"FAILED: {error}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
