#!/usr/bin/env python3
"""Writes the seed corpora of the backends fuzz targets (corpus/<target>/<name>).

Each input is the start of a 64 KiB guest memory (see backends/src/fuzzing.rs): a 16-entry
descriptor table at 0x0, the available ring at 0x100, the used ring at 0x200. Byte 0 (the
low byte of descriptor 0's address) holds the harness flags, so descriptor 0 is left unused
and chains start at descriptor 1. Run from anywhere: python3 make_seeds.py
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
NEXT, WRITE, INDIRECT = 1, 2, 4


class Mem:
    def __init__(self, flags=0):
        self.b = bytearray(0x300)
        self.b[0] = flags
        self.heads = []

    def put(self, addr, data):
        if len(self.b) < addr + len(data):
            self.b.extend(bytes(addr + len(data) - len(self.b)))
        self.b[addr:addr + len(data)] = data

    def desc(self, i, addr, length, flags=0, nxt=0, table=0):
        self.put(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def chain(self, first, bufs):
        """bufs: (addr, len, writable); descriptors first, first+1, ..."""
        for k, (addr, length, w) in enumerate(bufs):
            last = k == len(bufs) - 1
            flags = (0 if last else NEXT) | (WRITE if w else 0)
            self.desc(first + k, addr, length, flags, 0 if last else first + k + 1)
        self.heads.append(first)

    def done(self):
        self.put(0x100, struct.pack("<HH", 0, len(self.heads)))
        for k, h in enumerate(self.heads):
            self.put(0x104 + 2 * k, struct.pack("<H", h))
        return bytes(self.b)


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# --- virtio-blk: header {type, reserved, sector}, data, status --------------------------
IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES = 0, 1, 4, 8, 11, 13


def blk(flags, typ, sector, data=None, seg=None):
    m = Mem(flags)
    m.put(0x300, struct.pack("<IIQ", typ, 0, sector))
    bufs = [(0x300, 16, False)]
    if data:
        bufs.append((0x400, data[0], data[1]))
    if seg:
        m.put(0x380, struct.pack("<QII", *seg))
        bufs.append((0x380, 16, False))
    bufs.append((0x800, 1, True))
    m.chain(1, bufs)
    return m


write("blk_request", "read", blk(0, IN, 2, (512, True)).done())
write("blk_request", "read_io_uring", blk(1, IN, 2, (1024, True)).done())
write("blk_request", "write", blk(0, OUT, 5, (512, False)).done())
write("blk_request", "write_readonly", blk(2, OUT, 5, (512, False)).done())
write("blk_request", "read_past_end", blk(0, IN, 1000, (512, True)).done())
write("blk_request", "flush", blk(0, FLUSH, 0).done())
write("blk_request", "get_id", blk(0, GET_ID, 0, (20, True)).done())
write("blk_request", "discard", blk(0, DISCARD, 0, seg=(8, 16, 0)).done())
write("blk_request", "write_zeroes_unmap", blk(1, WRITE_ZEROES, 0, seg=(0, 8, 1)).done())
# Two requests, event index on.
m = blk(0x80, IN, 0, (512, True))
m.put(0x340, struct.pack("<IIQ", OUT, 0, 1))
m.desc(4, 0x340, 16, NEXT, 5)
m.desc(5, 0x600, 512, NEXT, 6)
m.desc(6, 0x801, 1, WRITE, 0)
m.heads.append(4)
write("blk_request", "two_requests_event_idx", m.done())
# The read as an indirect table at 0x900.
m = Mem(0)
m.put(0x300, struct.pack("<IIQ", IN, 0, 3))
m.desc(0, 0x300, 16, NEXT, 1, table=0x900)
m.desc(1, 0x400, 512, NEXT | WRITE, 2, table=0x900)
m.desc(2, 0x800, 1, WRITE, 0, table=0x900)
m.desc(1, 0x900, 48, INDIRECT)
m.heads.append(1)
write("blk_request", "indirect_read", m.done())

# --- virtio-net TX: virtio_net_hdr (12 bytes) + Ethernet frame ----------------------------
def frame(payload_len=18, proto=17):
    eth = bytes.fromhex("ffffffffffff020000000001") + b"\x08\x00"
    total = 20 + (8 if proto == 17 else 20) + payload_len
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, total, 1, 0, 64, proto, 0,
                     bytes([192, 0, 2, 2]), bytes([192, 0, 2, 1]))
    if proto == 17:
        l4 = struct.pack(">HHHH", 1234, 5678, 8 + payload_len, 0)
    else:
        l4 = struct.pack(">HHIIBBHHH", 1234, 5678, 1, 0, 0x50, 0x18, 65535, 0, 0)
    return eth + ip + l4 + bytes(i & 0xff for i in range(payload_len))


def vnet_hdr(flags=0, gso_type=0, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0):
    return struct.pack("<BBHHHHH", flags, gso_type, hdr_len, gso_size, csum_start,
                       csum_offset, 0)


def tx(*frames, split=False):
    m = Mem(0)
    addr, d = 0x300, 1
    for hdr, f in frames:
        if split:
            m.put(addr, hdr)
            m.put(addr + 0x20, f)
            m.chain(d, [(addr, 12, False), (addr + 0x20, len(f), False)])
            d += 2
            addr += 0x20 + len(f)
        else:
            m.put(addr, hdr + f)
            m.chain(d, [(addr, 12 + len(f), False)])
            d += 1
            addr += 12 + len(f)
        addr = (addr + 15) & ~15
    return m.done()


write("net_tx", "udp", tx((vnet_hdr(), frame())))
write("net_tx", "udp_split_header", tx((vnet_hdr(), frame()), split=True))
write("net_tx", "udp_csum_offload", tx((vnet_hdr(1, 0, 0, 0, 34, 6), frame())))
write("net_tx", "tcp_tso", tx((vnet_hdr(1, 1, 54, 1448, 34, 16), frame(3000, 6))))
write("net_tx", "two_frames", tx((vnet_hdr(), frame()), (vnet_hdr(), frame(100))))
write("net_tx", "header_only", tx((vnet_hdr(), b"")))

# --- virtio-net RX: writable buffers; the frame from the tap is input[0x8000..] -----------
def rx(flags, bufs, f):
    m = Mem(flags)
    for k, (addr, length) in enumerate(bufs):
        m.chain(1 + k, [(addr, length, True)])
    b = bytearray(m.done())
    b.extend(bytes(0x8000 - len(b)))
    return bytes(b) + f


write("net_rx", "one_buffer", rx(0, [(0x1000, 1526)], frame()))
write("net_rx", "mergeable_buffers", rx(1, [(0x1000 + 0x100 * k, 256) for k in range(4)],
                                        frame(600)))
write("net_rx", "buffer_too_small", rx(0, [(0x1000, 8)], frame()))

# --- virtio-net control queue: {class, cmd}, data..., ack ---------------------------------
def ctrl(cls, cmd, *datas):
    m = Mem(0)
    m.put(0x300, bytes([cls, cmd]))
    bufs = [(0x300, 2, False)]
    addr = 0x340
    for d in datas:
        m.put(addr, d)
        bufs.append((addr, len(d), False))
        addr += (len(d) + 15) & ~15
    bufs.append((0x3f0, 1, True))
    m.chain(1, bufs)
    return m.done()


mac = bytes.fromhex("020000000002")
write("net_ctrl", "rx_promisc", ctrl(0, 0, b"\x01"))
write("net_ctrl", "mac_table_set", ctrl(1, 0, struct.pack("<I", 1) + mac, struct.pack("<I", 0)))
write("net_ctrl", "mac_addr_set", ctrl(1, 1, mac))
write("net_ctrl", "announce_ack", ctrl(3, 0))
write("net_ctrl", "mq_vq_pairs_set", ctrl(4, 0, struct.pack("<H", 2)))
write("net_ctrl", "guest_offloads_set", ctrl(5, 0, struct.pack("<Q", 0x7)))


# --- vhost_user_relay: a frontend's messages with fds ----------------------------------
# The format is the generator in backends/src/fuzzing/vhost_user.rs (`Gen::message`): byte 0
# holds flags (bit 1: back-end replies first; bits 6 and 7: a real vhost-user-blk daemon
# behind the relay, whose memfds are then filled from the input), then per message an
# opcode, a flags byte (bit 0: NEED_REPLY) and its arguments.
class Relay:
    def __init__(self, flags=0):
        self.b = bytearray([flags])
        self.serve = flags & 0xC0 == 0xC0

    def op(self, op, need_reply=False, *args):
        self.b += bytes([op, 1 if need_reply else 0]) + bytes(args)
        return self

    def memfd(self, pages=16, fill=b""):
        # kind 2: a memfd of `pages` 4 KiB pages (size code < 64)
        self.b += bytes([2, pages])
        if self.serve:
            self.b += struct.pack("<H", len(fill)) + fill

    def region(self, m=0, *extra):
        # m = 0: the whole file, fd offset 0, guest address and frontend address from the
        # slot (16 MiB apart).
        self.b += bytes([m]) + bytes(extra)

    def mem_table(self, sizes, need_reply=False, region_modes=None, fills=None):
        self.op(1, need_reply, 0x30 | (len(sizes) - 1))
        for k, pages in enumerate(sizes):
            self.memfd(pages, (fills or {}).get(k, b""))
            self.region(*(region_modes or {}).get(k, (0,)))
        return self

    def add_region(self, slot, pages, mode=(0,)):
        self.op(2, False, 0x60 | slot)
        self.memfd(pages)
        self.region(*mode)
        return self

    def rem_region(self, index):
        return self.op(4, False, index)

    def vring_num(self, q, log2):
        return self.op(5, False, q, log2)

    def vring_addr(self, q, desc, used, avail, region=0):
        self.op(6, False, q)
        for off in (desc, used, avail):
            self.b += bytes([region]) + struct.pack("<H", off // 16)
        return self

    def protocol_features(self, reply_ack=True, inflight=True, mq=True, config=True):
        return self.op(7, False, reply_ack | inflight << 1 | mq << 2 | config << 3)

    def get_inflight(self, nq, qs_log2):
        return self.op(8, False, nq - 1, qs_log2, 1)

    def set_inflight(self, nq, qs_log2, c=0x80, *extra):
        return self.op(9, True, nq - 1, qs_log2, c, *extra)

    def vring_fd(self, which, q, invalid=False):
        # which: 0 kick, 1 call, 2 err
        return self.op(10, False, which, q | (0x80 if invalid else 0))

    def features(self):
        return self.op(11, False, 0)

    def enable(self, q):
        return self.op(11, False, 133, q)

    def vring_base(self, q, base):
        self.op(11, False, 2, q)
        return self.raw(struct.pack("<H", base))

    def owner(self):
        return self.op(11, False, 3)

    def get(self, which):
        # GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM
        return self.op(11, False, [4, 10, 16][which])

    def raw(self, b):
        self.b += b
        return self

    def setup_queue(self, q, log2=8, ring_region=0):
        self.vring_num(q, log2).vring_addr(q, 0, 0x200, 0x100, ring_region)
        self.vring_base(q, 0).vring_fd(1, q).vring_fd(0, q).enable(q)
        return self


def relay_seed(name, r):
    write("vhost_user_relay", name, bytes(r.b))


r = Relay().owner().get(0).get(1).protocol_features().features()
r.mem_table([16, 32]).get_inflight(2, 7).set_inflight(2, 7)
relay_seed("qemu_like_setup", r.setup_queue(0).setup_queue(1, ring_region=1))

r = Relay().protocol_features(inflight=False).features()
# Region 0 runs 8 KiB past the end of its memfd (size mode 2, 1 + 1 extra pages).
relay_seed("region_past_end", r.mem_table([4], True, region_modes={0: (2, 1)}).setup_queue(0))

r = Relay().protocol_features().features()
r.add_region(0, 16).add_region(1, 16).add_region(2, 4)
# Overlapping the first one (guest address mode 1: 0 MiB), then removed and added again.
r.add_region(3, 16, (0x10, 0)).rem_region(1).add_region(1, 16)
relay_seed("add_remove_regions", r.setup_queue(0, log2=4, ring_region=2))

r = Relay().protocol_features().features().mem_table([16])
# A region file one byte short, at an unaligned offset, then an eventfd as the region.
r.set_inflight(1, 7, 0x80 | 0x04, 0).set_inflight(1, 7, 0x82, 0x10, 0x00).set_inflight(1, 7, 0x00)
relay_seed("inflight_bad_files", r)

r = Relay().owner().enable(0).enable(1).features().mem_table([16]).setup_queue(0)
relay_seed("early_vring_enable", r)

# The back-end answers GET_PROTOCOL_FEATURES (twice) and GET_QUEUE_NUM first.
r = Relay(2).raw(bytes([3, 0]) + struct.pack("<Q", 0x8B) + bytes([0]) + struct.pack("<Q", 1))
r.raw(bytes([5, 4]) + b"\x01\x02\x03\x04")
relay_seed("backend_replies", r.get(1).protocol_features().get(2))

r = Relay().protocol_features().features().mem_table([16, 16, 16], True)
r.vring_num(0, 16).vring_num(1, 0x80).raw(struct.pack("<H", 3))
r.vring_addr(0, 0xFFF0 * 16, 0, 0x100).raw(bytes([0, 1, 0x20, 10, 0]) + bytes(20))
relay_seed("bad_queue_sizes_and_rings", r)

# A real vhost-user-blk daemon behind the relay: one queue of 16 with a READ of sector 0
# (descriptor table at 0, available ring at 0x100, used ring at 0x200 of region 0).
ram = bytearray(0x700)
for i, (addr, length, flags, nxt) in enumerate([(0x300, 16, NEXT, 1), (0x400, 512, NEXT | WRITE, 2),
                                               (0x600, 1, WRITE, 0)]):
    ram[16 * i:16 * i + 16] = struct.pack("<QIHH", addr, length, flags, nxt)
ram[0x100:0x106] = struct.pack("<HHH", 0, 1, 0)
ram[0x300:0x310] = struct.pack("<IIQ", 0, 0, 0)
r = Relay(0xC0).owner().get(0).get(1).protocol_features().features()
r.mem_table([16], fills={0: bytes(ram)}).get_inflight(2, 4)
relay_seed("serve_blk_read", r.setup_queue(0, log2=4))
