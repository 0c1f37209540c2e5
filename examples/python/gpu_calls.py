"""The binding's GPU calls. Without CUDA (no torch with a GPU, or no driver)
every one refuses clearly: M2NError with code ERR_STREAM naming what is
missing, and GPU memory refused over shm with a message. With a GPU and
torch, a 1 x 1 group over shm sends from a CUDA tensor with
send_on_stream (the producer is a fill on the stream, then overwritten
right after: the stream must hold the overwrite until the round left) and
receives with recv_on_stream into a CUDA tensor (copied on the stream by
the copy engine after the gated wait); every byte is checked.

    python3 gpu_calls.py      # exits 0 on success
"""

import ctypes
import sys
import threading

import m2n

ROUNDS, LEN = 20, 4096


def pair():
    uid = m2n.unique_id()
    box = {}

    def expert():
        box["e"] = m2n.Communicator(m2n.EXPERT, 0, 1, 1, uid, transport="shm", slot_bytes=1 << 16, depth=2)

    t = threading.Thread(target=expert)
    t.start()
    a = m2n.Communicator(m2n.ATTENTION, 0, 1, 1, uid, transport="shm", slot_bytes=1 << 16, depth=2)
    t.join()
    return a, box["e"]


def refused(what, call, code=None, words=("CUDA", "GPU", "context", "not available")):
    try:
        call()
    except m2n.M2NError as err:
        if code is not None and err.code != code:
            print(f"FAIL {what}: code {err.code}, want {code}: {err}")
            return 1
        if not any(w in str(err) for w in words):
            print(f"FAIL {what}: the message does not say what is missing: {err}")
            return 1
        print(f"ok   {what}: {err}")
        return 0
    print(f"FAIL {what}: accepted")
    return 1


def without_cuda(a, e):
    buf = bytearray(64)
    mem = a.register(buf)
    bad = 0
    bad += refused("send_on_stream", lambda: a.send_on_stream([(mem, 0, 8)], None), m2n.ERR_STREAM)
    bad += refused("recv_on_stream", lambda: e.recv_on_stream(None), m2n.ERR_STREAM)
    bad += refused("register_device over shm", lambda: a.register_device(0x7F0000000000, 64))
    a.start_proxy()
    a.stop_proxy()
    return bad


def with_cuda(a, e, torch):
    cuda = ctypes.CDLL("libcuda.so.1")
    cuda.cuMemcpyAsync.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]
    src = torch.zeros(LEN, dtype=torch.uint8, device="cuda")
    sa, se = torch.cuda.Stream(), torch.cuda.Stream()
    mem = a.register_tensor(src)
    a.start_proxy()
    e.start_proxy()
    outs = [torch.zeros(LEN, dtype=torch.uint8, device="cuda") for _ in range(ROUNDS)]
    for k in range(ROUNDS):
        with torch.cuda.stream(sa):
            src.fill_(k + 1)
            a.send_on_stream([(mem, 0, LEN)], sa)
            src.fill_(0xEE)  # the next writer: held until the round left
        rnd = e.recv_on_stream(se)
        rc = cuda.cuMemcpyAsync(outs[k].data_ptr(), rnd.data_ptr(0), LEN, se.cuda_stream)
        if rc != 0:
            print(f"FAIL cuMemcpyAsync: {rc}")
            return 1
        rnd.release_on_stream(se)
    sa.synchronize()
    se.synchronize()
    bad = sum(1 for k in range(ROUNDS) if not bool((outs[k] == k + 1).all()))
    print(f"gpu_calls.py: {ROUNDS} stream-ordered rounds from a CUDA tensor over shm, {bad} wrong")
    return bad


def main():
    a, e = pair()
    try:
        import torch

        gpu = torch.cuda.is_available()
    except ImportError:
        torch, gpu = None, False
    bad = with_cuda(a, e, torch) if gpu else without_cuda(a, e)
    if not gpu:
        print(f"gpu_calls.py: no CUDA here; every GPU call refused clearly{'' if bad == 0 else ' (NOT)'}")
    e.close()
    a.close()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
