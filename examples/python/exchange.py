"""Two processes exchange bytearrays through m2n: an attention rank
dispatches, an expert answers on combine; both check every byte.

    python3 exchange.py            # launcher: starts both ranks, exits 0 on success
"""

import subprocess
import sys

import m2n

ROUNDS = 50


def message(channel, round_number, size=1000):
    return bytearray(((channel * 31 + round_number * 7 + i) % 251) for i in range(size))


def attention(uid):
    with m2n.Communicator(m2n.ATTENTION, 0, 1, 1, uid, transport="shm", slot_bytes=4096) as comm:
        out = bytearray(1000)
        mem = comm.register(out)
        for k in range(ROUNDS):
            out[:] = message(0, k)
            comm.wait_send(comm.send([(mem, 0, len(out))]))
            with comm.recv() as rnd:
                got = bytes(rnd.data(0))
                if rnd.number != k or got != bytes(message(1, k)):
                    print(f"attention: round {k}: wrong bytes back")
                    return 2
    print(f"attention: {ROUNDS} rounds, every byte checked")
    return 0


def expert(uid):
    with m2n.Communicator(m2n.EXPERT, 0, 1, 1, uid, transport="shm", slot_bytes=4096) as comm:
        out = bytearray(1000)
        mem = comm.register(out)
        for k in range(ROUNDS):
            with comm.recv() as rnd:
                if bytes(rnd.data(0)) != bytes(message(0, k)):
                    print(f"expert: round {k}: wrong bytes")
                    return 2
            out[:] = message(1, k)
            comm.wait_send(comm.send([(mem, 0, len(out))]))
    print(f"expert: {ROUNDS} rounds, every byte checked")
    return 0


def main():
    if len(sys.argv) == 3:
        return {"attention": attention, "expert": expert}[sys.argv[1]](sys.argv[2])
    uid = m2n.unique_id()
    ranks = [subprocess.Popen([sys.executable, __file__, role, uid]) for role in ("attention", "expert")]
    codes = [p.wait(timeout=120) for p in ranks]
    print("exchange.py:", "passed" if codes == [0, 0] else f"failed {codes}")
    return 0 if codes == [0, 0] else 1


if __name__ == "__main__":
    sys.exit(main())
