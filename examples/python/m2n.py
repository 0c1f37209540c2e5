"""A small ctypes binding over the installed C library (libm2n.so).

The library is found through $M2N_LIB (a path), else the dynamic loader's
search path (LD_LIBRARY_PATH, ldconfig) as libm2n.so.0.

    import m2n
    uid = m2n.unique_id()                      # launcher: root runs in this process
    comm = m2n.Communicator(m2n.ATTENTION, 0, 1, 1, uid, transport="shm")
    buf = bytearray(b"tokens")
    mem = comm.register(buf)                   # zero-copy source
    r = comm.send([(mem, 0, len(buf))])
    comm.wait_send(r)
    with comm.recv() as rnd:                   # zero-copy views, released on exit
        print(bytes(rnd.data(0)))

On a GPU (libm2n built with CUDA, the default), stream-ordered calls take a
CUDA stream: an int, or anything with a `cuda_stream` attribute such as
`torch.cuda.current_stream()`:

    mem = comm.register_tensor(t)              # t.data_ptr(), t.nbytes (GPU or CPU)
    comm.start_proxy()                         # drives the host's half
    r = comm.send_on_stream([(mem, 0, t.nbytes)], torch.cuda.current_stream())
    rnd = comm.recv_on_stream(stream)          # rnd.data_ptr(s): where kernels read
    rnd.release_on_stream(stream)
"""

import ctypes
import os

ATTENTION, EXPERT = 0, 1
_TRANSPORTS = {"auto": 0, "shm": 1, "tcp": 2, "verbs": 3, "cuda-ipc": 4}
SUCCESS, AGAIN = 0, 1
ERR_STREAM = 12


def _load():
    path = os.environ.get("M2N_LIB")
    return ctypes.CDLL(path or "libm2n.so.0")


_lib = _load()


class Config(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("version", ctypes.c_uint32),
        ("transport", ctypes.c_uint32),
        ("dispatch_depth", ctypes.c_uint32),
        ("combine_depth", ctypes.c_uint32),
        ("dispatch_slot_bytes", ctypes.c_uint64),
        ("combine_slot_bytes", ctypes.c_uint64),
        ("peer_timeout_ms", ctypes.c_uint32),
        ("bootstrap_timeout_ms", ctypes.c_uint32),
        ("apply_env", ctypes.c_uint32),
    ]


class UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_char * 128)]


class Msg(ctypes.Structure):
    _fields_ = [("mem", ctypes.c_void_p), ("offset", ctypes.c_size_t), ("len", ctypes.c_size_t)]


_P = ctypes.c_void_p
_lib.m2n_get_error_string.restype = ctypes.c_char_p
_lib.m2n_comm_get_last_error.restype = ctypes.c_char_p
_lib.m2n_comm_get_last_error.argtypes = [_P]
for name, args in {
    "m2n_config_init": [ctypes.POINTER(Config), ctypes.c_size_t],
    "m2n_get_unique_id": [ctypes.POINTER(UniqueId)],
    "m2n_unique_id_from_string": [ctypes.c_char_p, ctypes.POINTER(UniqueId)],
    "m2n_comm_init": [ctypes.POINTER(_P), ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.POINTER(UniqueId), ctypes.POINTER(Config)],
    "m2n_comm_destroy": [_P],
    "m2n_comm_abort": [_P],
    "m2n_reg_mem": [_P, _P, ctypes.c_size_t, ctypes.POINTER(_P)],
    "m2n_dereg_mem": [_P, _P],
    "m2n_send": [_P, ctypes.POINTER(Msg), ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_uint64)],
    "m2n_wait_send": [_P, ctypes.c_uint64, ctypes.c_int],
    "m2n_wait_recv": [_P, ctypes.c_int, ctypes.POINTER(_P)],
    "m2n_round_number": [_P, _P, ctypes.POINTER(ctypes.c_uint64)],
    "m2n_round_data": [_P, _P, ctypes.c_int, ctypes.POINTER(_P), ctypes.POINTER(ctypes.c_size_t)],
    "m2n_round_release": [_P, _P],
    "m2n_reg_mem_device": [_P, _P, ctypes.c_size_t, ctypes.POINTER(_P)],
    "m2n_send_stream": [_P, ctypes.POINTER(Msg), ctypes.c_int, _P, ctypes.POINTER(ctypes.c_uint64)],
    "m2n_recv_stream": [_P, _P, ctypes.POINTER(_P)],
    "m2n_round_release_stream": [_P, _P, _P],
    "m2n_comm_start_proxy": [_P],
    "m2n_comm_stop_proxy": [_P],
}.items():
    fn = getattr(_lib, name)
    fn.argtypes = args
    fn.restype = ctypes.c_int


class M2NError(RuntimeError):
    def __init__(self, code, detail):
        self.code = code
        name = _lib.m2n_get_error_string(code).decode()
        super().__init__(f"m2n error {code} ({name}): {detail}")


def _check(code, comm=None):
    if code != SUCCESS:
        raise M2NError(code, (_lib.m2n_comm_get_last_error(comm) or b"").decode())


def unique_id():
    """A fresh unique id; its rendezvous is served from this process."""
    uid = UniqueId()
    _check(_lib.m2n_get_unique_id(ctypes.byref(uid)))
    return uid.internal.decode()


class Mem:
    """A registered buffer; keeps the Python object alive while registered."""

    def __init__(self, comm, handle, owner):
        self.comm, self.handle, self.owner = comm, handle, owner


class _RoundHandle:
    """A round handle of a communicator, with its number."""

    def __init__(self, comm, handle):
        self.comm, self.handle = comm, handle
        n = ctypes.c_uint64()
        _check(_lib.m2n_round_number(comm._h, handle, ctypes.byref(n)), comm._h)
        self.number = n.value


class Round(_RoundHandle):
    """A received round: zero-copy views valid until release (or `with` exit)."""

    def data(self, sender):
        ptr, length = _P(), ctypes.c_size_t()
        _check(_lib.m2n_round_data(self.comm._h, self.handle, sender, ctypes.byref(ptr), ctypes.byref(length)),
               self.comm._h)
        if length.value == 0:
            return memoryview(b"")
        return memoryview((ctypes.c_char * length.value).from_address(ptr.value)).cast("B")

    def release(self):
        if self.handle is not None:
            _check(_lib.m2n_round_release(self.comm._h, self.handle), self.comm._h)
            self.handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _stream(stream):
    """A CUDA stream handle from an int or an object with `cuda_stream`
    (torch.cuda.Stream); None is the legacy default stream."""
    if stream is None:
        return None
    return getattr(stream, "cuda_stream", stream)


class StreamRound(_RoundHandle):
    """A round from recv_on_stream: its addresses are known at once; work
    enqueued on the stream after the receive sees the data."""

    def _data(self, sender):
        ptr, length = _P(), ctypes.c_size_t()
        rc = _lib.m2n_round_data(self.comm._h, self.handle, sender, ctypes.byref(ptr), ctypes.byref(length))
        if rc not in (SUCCESS, AGAIN):
            _check(rc, self.comm._h)
        return ptr.value, (length.value if rc == SUCCESS else None)

    def data_ptr(self, sender):
        """Where `sender`'s message is, as work on the stream addresses it."""
        return self._data(sender)[0]

    def length(self, sender):
        """The message's length once the round is in (None before)."""
        return self._data(sender)[1]

    def release_on_stream(self, stream):
        _check(_lib.m2n_round_release_stream(self.comm._h, self.handle, _stream(stream)), self.comm._h)
        self.handle = None


class Communicator:
    def __init__(self, role, rank, n_attention, n_experts, uid, transport="auto", slot_bytes=None, depth=None,
                 peer_timeout_ms=None):
        cfg = Config()
        _check(_lib.m2n_config_init(ctypes.byref(cfg), ctypes.sizeof(cfg)))
        cfg.transport = _TRANSPORTS[transport]
        if slot_bytes is not None:
            cfg.dispatch_slot_bytes = cfg.combine_slot_bytes = slot_bytes
        if depth is not None:
            cfg.dispatch_depth = cfg.combine_depth = depth
        if peer_timeout_ms is not None:
            cfg.peer_timeout_ms = peer_timeout_ms
        parsed = UniqueId()
        _check(_lib.m2n_unique_id_from_string(uid.encode(), ctypes.byref(parsed)))
        h = _P()
        _check(_lib.m2n_comm_init(ctypes.byref(h), role, rank, n_attention, n_experts, ctypes.byref(parsed),
                                  ctypes.byref(cfg)))
        self._h = h
        self._mems = []

    def register(self, buf):
        """Registers a writable buffer (bytearray, ctypes array, or a raw
        (address, length) pair such as a tensor's data_ptr() and nbytes)."""
        if isinstance(buf, tuple):
            addr, length = buf
        else:
            arr = (ctypes.c_char * len(buf)).from_buffer(buf)
            addr, length = ctypes.addressof(arr), len(buf)
        m = _P()
        _check(_lib.m2n_reg_mem(self._h, addr, length, ctypes.byref(m)), self._h)
        mem = Mem(self, m, buf)
        self._mems.append(mem)
        return mem

    def register_device(self, ptr, length):
        """Registers GPU memory (a device pointer of this process): zero-copy
        over verbs and cuda-ipc, through a pinned host stage over shm and tcp."""
        m = _P()
        _check(_lib.m2n_reg_mem_device(self._h, ptr, length, ctypes.byref(m)), self._h)
        mem = Mem(self, m, (ptr, length))
        self._mems.append(mem)
        return mem

    def register_tensor(self, t):
        """Registers a contiguous tensor (CUDA or CPU) by data_ptr() and nbytes."""
        mem = (self.register_device if t.is_cuda else lambda p, n: self.register((p, n)))(t.data_ptr(), t.nbytes)
        mem.owner = t
        return mem

    def _msgs(self, msgs):
        arr = (Msg * len(msgs))()
        for i, m in enumerate(msgs):
            arr[i] = Msg(None, 0, 0) if m is None else Msg(m[0].handle, m[1], m[2])
        return arr

    def send_on_stream(self, msgs, stream):
        """Enqueues a round on a CUDA stream: it leaves once the stream's
        earlier work is done; later work waits until it has left."""
        r = ctypes.c_uint64()
        _check(_lib.m2n_send_stream(self._h, self._msgs(msgs), len(msgs), _stream(stream), ctypes.byref(r)),
               self._h)
        return r.value

    def recv_on_stream(self, stream):
        """Enqueues a receive of the next round on a CUDA stream."""
        h = _P()
        _check(_lib.m2n_recv_stream(self._h, _stream(stream), ctypes.byref(h)), self._h)
        return StreamRound(self, h)

    def start_proxy(self):
        """A thread that drives m2n's progress (needed by the stream calls)."""
        _check(_lib.m2n_comm_start_proxy(self._h), self._h)

    def stop_proxy(self):
        _check(_lib.m2n_comm_stop_proxy(self._h), self._h)

    def send(self, msgs, timeout_ms=30000):
        """Posts a round: one (mem, offset, length) per receiver, or None for
        an empty message. The buffers must not change until wait_send()."""
        r = ctypes.c_uint64()
        _check(_lib.m2n_send(self._h, self._msgs(msgs), len(msgs), timeout_ms, ctypes.byref(r)), self._h)
        return r.value

    def wait_send(self, round_number, timeout_ms=30000):
        _check(_lib.m2n_wait_send(self._h, round_number, timeout_ms), self._h)

    def recv(self, timeout_ms=30000):
        h = _P()
        _check(_lib.m2n_wait_recv(self._h, timeout_ms, ctypes.byref(h)), self._h)
        return Round(self, h)

    def abort(self):
        _check(_lib.m2n_comm_abort(self._h), self._h)

    def close(self):
        if self._h is not None:
            for m in self._mems:
                _lib.m2n_dereg_mem(self._h, m.handle)
            _check(_lib.m2n_comm_destroy(self._h))
            self._h = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
