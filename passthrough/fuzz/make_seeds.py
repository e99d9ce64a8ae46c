#!/usr/bin/env python3
"""Writes the seed corpus of the passthrough fuzz targets (see the input formats at the top
of each target): corpus/<target>/<name>. Run from this directory."""
import os
import struct

# Offsets of HOT in passthrough_device.rs.
HOT = {0x04: 0, 0x10: 1, 0x14: 2, 0x18: 3, 0x20: 4, 0x24: 5, 0x30: 6, 0x3c: 7,
       0x44: 8, 0x50: 9, 0x60: 10, 0x64: 11, 0x6c: 12, 0x70: 13, 0x78: 14, 0x7a: 15}
LEN = {1: 0, 2: 1, 4: 2, 8: 3}


def hot(off, data):
    """Kind 1: a config write at HOT offset `off`."""
    return bytes([1 | LEN[len(data)] << 3, HOT[off], 0]) + data


def bar(write, index, offset, data=b"", length=4):
    """Kinds 3 (write) and 4 (read): BAR `index` at a 21-bit `offset`."""
    hi = offset >> 16
    # b >> 3 is the offset's top bits, b % 7 the BAR: 8 values of b share b >> 3.
    b = next(x for x in range(hi << 3, (hi << 3) + 8) if x % 7 == index)
    n = len(data) if write else length
    head = bytes([(3 if write else 4) | LEN[n] << 3, (offset >> 8) & 0xff, b, offset & 0xff])
    return head + data


def entry(vector, addr, data, ctrl):
    """Kind 5: an MSI-X table entry, dword by dword."""
    out = b""
    for field, v in ((0, addr), (4, 0), (8, data), (12, ctrl)):
        out += bytes([5 | LEN[4] << 3, field, vector]) + struct.pack("<I", v)
    return out


def u16(v):
    return struct.pack("<H", v)


def u32(v):
    return struct.pack("<I", v)


# MSI programmed, then Message Control (HOT 0x60 + 2) enabling 4 vectors.
MSI_ON = (hot(0x64, u32(0xfee00000)) + hot(0x6c, u32(0x41))
          + bytes([1 | LEN[2] << 3, HOT[0x60], 2]) + u16((1 << 8) | (1 << 7) | (2 << 1) | (2 << 4) | 1))
MSIX_ON = hot(0x7a, u16(0xc004)) + entry(0, 0xfee00000, 0x51, 0) + hot(0x7a, u16(0x8004))

device = {
    # A Linux driver's path: sizing, decode on, MSI-X, registers, decode off.
    "linux_msix": hot(0x04, u16(0x0000)) + hot(0x10, u32(0xffffffff)) + hot(0x10, u32(0xd0000000))
    + hot(0x04, u16(0x0007)) + MSIX_ON + bar(True, 0, 0x100, u32(1)) + bar(False, 0, 0x100)
    + bar(False, 0, 0x18000, length=8) + hot(0x7a, u16(0x0004)) + hot(0x04, u16(0x0000)),
    # MSI and MSI-X at once, MSE cleared, the BAR touched, a sane request after.
    "msi_and_msix": hot(0x04, u16(0x0006)) + MSI_ON + MSIX_ON + bar(False, 0, 0x2000)
    + hot(0x04, u16(0x0004)) + bar(False, 0, 0x2000) + bar(True, 4, 0x10, u32(7))
    + bytes([1 | LEN[2] << 3, HOT[0x60], 2]) + u16(0) + MSIX_ON + hot(0x04, u16(0x0006))
    + bar(False, 0, 0x100),
    # INTx Disable around MSI, D3hot with decoding on, the ROM.
    "intx_d3_rom": hot(0x04, u16(0x0403)) + MSI_ON + bytes([1 | LEN[2] << 3, HOT[0x60], 2]) + u16(0)
    + hot(0x04, u16(0x0003)) + hot(0x44, u16(3)) + bar(False, 2, 0) + bar(False, 6, 0x10)
    + hot(0x44, u16(0)) + hot(0x30, u32(0xd8000001)) + bar(False, 6, 0x5ffe) + bar(True, 6, 0, u32(0)),
    # VFIO refusing MSI-X, then faults on the mappings.
    "refused_and_faults": hot(0x04, u16(0x0002)) + bytes([6, 2, 0]) + MSIX_ON + bytes([6, 2, 0])
    + MSIX_ON + bytes([7, 0, 0]) + bytes([7, 1, 1]) + bar(False, 4, 0) + hot(0x04, u16(0))
    + hot(0x04, u16(2)) + bytes([7, 0, 3]),
}

msix = {
    # Count 5; entries, enable masked, unmask, raise, PBA, mask an entry.
    "driver": bytes([4]) + bytes([5, 0, 0]) + bytes([5, 1, 1]) + bytes([0, 3, 0]) + bytes([0, 1, 0])
    + bytes([4, 1, 0]) + bytes([3 | 7 << 3, 0, 0]) + bytes([6, 0, 1]) + bytes([4, 0, 0])
    + bytes([3, 0, 0]) + bytes([7, 0, 0]),
    # Count 40: odd sizes, straddling and far accesses.
    "hostile": bytes([39]) + bytes([0, 1, 0]) + bytes([1 | 1 << 3, 0x0e, 0]) + b"\x01\x02"
    + bytes([1 | 3 << 3, 0x0c, 0]) + b"12345678" + bytes([1 | 2 << 3, 0x80, 2]) + b"\0\0\0\0"
    + bytes([1 | 2 << 3, 0xff, 0xff]) + b"abcd" + bytes([2 | 3 << 3, 0x7c, 2]) + bytes([3 | 7 << 3, 0xff, 0])
    + bytes([4, 39, 0]) + bytes([4, 200, 0]) + bytes([3 | 7 << 3, 0, 0]),
}

for target, seeds in (("passthrough_device", device), ("passthrough_msix", msix)):
    d = os.path.join("corpus", target)
    os.makedirs(d, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
