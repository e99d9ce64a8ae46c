#!/usr/bin/env python3
"""Writes the seed corpus of the virtio_pci_registers fuzz target (corpus/<target>/<name>).

The input format is described in fuzz_targets/virtio_pci_registers.rs: operations
[op, a, b] followed by the bytes they write. Run from anywhere: python3 make_seeds.py
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET = "virtio_pci_registers"
# Capability offsets in configuration space, as the transport lays them out.
PCI_CFG_CAP = 0x84
MSIX_CAP = 0x98


class Seq:
    def __init__(self):
        self.b = bytearray()

    def common_w(self, off, value, size):
        self.b += bytes([0 | ((size - 1) << 3), off, 0]) + value.to_bytes(size, "little")

    def common_r(self, off, size):
        self.b += bytes([3 | ((size - 1) << 3), off, 0])

    def bar_w(self, off, value, size):
        self.b += bytes([1 | ((size - 1) << 3)]) + struct.pack("<H", off)
        self.b += value.to_bytes(size, "little")

    def bar_r(self, off, size):
        self.b += bytes([2 | ((size - 1) << 3)]) + struct.pack("<H", off)

    def cfg_w(self, byte_off, value, size):
        reg, off = byte_off // 4, byte_off % 4
        self.b += bytes([4 | (off << 3) | ((size - 1) << 5), reg & 0xff, reg >> 8])
        self.b += value.to_bytes(size, "little")

    def cfg_r(self, reg):
        self.b += bytes([5, reg & 0xff, reg >> 8])

    def notify(self, q):
        self.b += bytes([6, q, 0])

    def status(self, v):
        self.b += bytes([7, v, 0])

    def negotiate(self, features=(1 << 32) | (1 << 29)):
        self.status(0)
        self.status(1)
        self.status(3)
        for sel in (0, 1):
            self.common_w(0x00, sel, 4)
            self.common_r(0x04, 4)
        for sel in (0, 1):
            self.common_w(0x08, sel, 4)
            self.common_w(0x0c, (features >> (32 * sel)) & 0xffffffff, 4)
        self.status(0x0b)
        self.common_r(0x14, 1)

    def queue(self, q, size, desc, avail, used, vector=0xffff):
        self.common_w(0x16, q, 2)
        self.common_r(0x18, 2)
        self.common_w(0x18, size, 2)
        self.common_w(0x1a, vector, 2)
        self.common_r(0x1a, 2)
        for off, addr in ((0x20, desc), (0x28, avail), (0x30, used)):
            self.common_w(off, addr & 0xffffffff, 4)
            self.common_w(off + 4, addr >> 32, 4)
        self.common_r(0x1e, 2)
        self.common_w(0x1c, 1, 2)


def write(name, s):
    d = os.path.join(HERE, "corpus", TARGET)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(bytes(s.b))


s = Seq()
s.negotiate()
s.common_w(0x10, 0, 2)
s.queue(0, 256, 0x10000, 0x11000, 0x12000, vector=1)
s.queue(1, 64, 0x20000, 0x21000, 0x22000, vector=2)
s.status(0x0f)
s.notify(0)
s.notify(1)
s.bar_w(0x3000, 0, 2)
s.common_r(0x14, 1)
s.status(0)
write("linux_bringup", s)

s = Seq()
for reg in range(0, 0x30):
    s.cfg_r(reg)
write("capability_walk", s)

s = Seq()
for v in range(4):
    s.bar_w(0x8000 + 16 * v, 0xfee00000, 4)
    s.bar_w(0x8004 + 16 * v, 0, 4)
    s.bar_w(0x8008 + 16 * v, 0x40 + v, 4)
    s.bar_w(0x800c + 16 * v, 0, 4)
s.cfg_w(MSIX_CAP + 2, 0x8000, 2)
s.bar_r(0xc000, 8)
s.cfg_w(MSIX_CAP + 2, 0xc000, 2)
s.bar_w(0x801c, 1, 4)
s.bar_r(0x8010, 8)
write("msix_program", s)

s = Seq()
s.cfg_w(PCI_CFG_CAP + 4, 0, 1)
s.cfg_w(PCI_CFG_CAP + 8, 0x14, 4)
s.cfg_w(PCI_CFG_CAP + 12, 1, 4)
s.cfg_w(PCI_CFG_CAP + 16, 1, 1)
s.cfg_r((PCI_CFG_CAP + 16) // 4)
s.cfg_w(PCI_CFG_CAP + 8, 0x3000, 4)
s.cfg_w(PCI_CFG_CAP + 12, 2, 4)
s.cfg_w(PCI_CFG_CAP + 16, 0, 2)
write("pci_cfg_window", s)

s = Seq()
s.cfg_w(0x10, 0xffffffff, 4)
s.cfg_w(0x14, 0xffffffff, 4)
s.cfg_r(4)
s.cfg_r(5)
s.cfg_w(0x10, 0xe0000000, 4)
s.cfg_w(0x14, 1, 4)
s.negotiate()
s.queue(0, 128, 0x10000, 0x11000, 0x12000)
s.status(0x0f)
s.notify(0)
write("bar_move", s)

s = Seq()
s.negotiate()
s.queue(0, 3, 0x10008, 0x11001, 0x12002)
s.queue(7, 16, 0xfffff000, 0, 0)
s.status(0x0f)
s.common_r(0x14, 1)
s.notify(5)
s.status(0)
write("hostile_queue", s)

s = Seq()
s.negotiate()
s.queue(0, 256, 0x10008, 0x11000, 0x12000)
s.queue(1, 64, 0x20000, 0x21001, 0x22002)
s.status(0x0f)
s.common_r(0x14, 1)
write("misaligned_rings", s)


# --- vhost_user_frontend ------------------------------------------------------------------
# Format: fuzz_targets/vhost_user_frontend.rs. Byte 0 bit 0: 0 a session against a fake
# back-end, 1 the outage path.
FE = "vhost_user_frontend"


def fe_write(name, b):
    d = os.path.join(HERE, "corpus", FE)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(bytes(b))


def session(net=False, queues=2, qs_log2=4, driver=0, script=b""):
    c = int(net) | (queues - 1) << 1 | qs_log2 << 3
    return bytes([0, c, driver]) + script


# Every request answered right (the fake's defaults): negotiate, activate, reset, activate.
fe_write("session_blk", session())
fe_write("session_net", session(net=True, queues=2, qs_log2=5))
fe_write("session_blk_no_reset", session(queues=4, qs_log2=7, driver=2))
# Per message the fake reads `how` (>= 0x80: a fault) and, for a request it answers, the
# values of its answer. Faults at a few points of the handshake and the setup.
for k, how in [(1, 0x80), (2, 0x90), (3, 0xA0), (4, 0xB0), (5, 0xC2), (6, 0xD0), (8, 0xE0),
               (12, 0xF0), (20, 0x90), (30, 0xE0)]:
    fe_write(f"session_fault_{k}_{how:02x}", session(script=bytes(k) + bytes([how])))
# GET_FEATURES without the protocol features bit; protocol features without CONFIG.
fe_write("session_no_protocol_features", session(script=bytes([0, 0, 1])))
fe_write("session_no_config", session(script=bytes([0, 0, 0, 0, 0x04])))
# An inflight region whose file is half the size it announces (a back-end's lie).
fe_write("session_inflight_short_file", session(script=bytes(14) + bytes([0, 1])))
# Long scripts (zeros: right answers) with a few faults late in the setup, so that the
# fuzzer starts from inputs long enough to script a whole session.
for k in (40, 60, 90):
    fe_write(f"session_long_{k}", session(queues=4, script=bytes(k) + bytes([0x85, 0x9f]) + bytes(200)))
fe_write("session_net_long", session(net=True, queues=3, qs_log2=6, script=bytes(256)))


def outage(steps, size_log2=3, region=True, block=True, lie=b"", start=0, shapes=0):
    c = (size_log2 - 1) | (0 if region else 0x40) | (0 if block else 0x80)
    b = bytes([1 | (2 if lie else 0), c, shapes]) + struct.pack("<HQ", start, 0)
    return b + bytes([len(steps)]) + bytes(steps) + lie


AV, TAKE = 0, 2


def done(k, crash=0):
    # Complete the k-th taken request; crash 2: die after publishing it, 3: before.
    return 3 | k << 2 | crash << 6


fe_write("outage_out_of_order", outage([AV] * 5 + [TAKE] * 4 + [done(2), done(2, 2)]))
fe_write("outage_crash_before_publish", outage([AV] * 4 + [TAKE] * 3 + [done(1), done(0, 3)]))
fe_write("outage_wraps", outage([AV, TAKE, done(0)] * 6 + [AV] * 3 + [TAKE], start=0xFFFC,
                                 shapes=0x55))
fe_write("outage_in_order", outage([AV] * 6 + [TAKE] * 4 + [done(0), done(0)], region=False))
fe_write("outage_net", outage([AV] * 3 + [TAKE] * 2 + [done(1)], block=False))
fe_write("outage_full_ring", outage([AV] * 8 + [TAKE] * 8 + [done(5), done(3, 2)], shapes=0xFF))
# A back-end region marking more in flight than the ring holds, and a rewound avail index.
fe_write("outage_lying_region", outage([AV] * 3 + [TAKE] * 2, lie=bytes([0, 16 + 16 * 5, 0, 1,
                                                                           0, 16 + 16 * 6, 0, 1])))
fe_write("outage_rewound_avail", outage([AV] * 4 + [TAKE] * 3, lie=bytes([1, 2, 0, 0])))
