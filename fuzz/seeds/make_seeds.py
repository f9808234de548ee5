#!/usr/bin/env python3
"""Writes the small seed inputs of each fuzz target into seeds/<target>/.
Run from fuzz/: python3 seeds/make_seeds.py (the Makefile's fuzz target does)."""
import json, os, struct

def crc32c(data, crc=0):
    crc ^= 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF

def frame(kind, payload, rid=0):
    return struct.pack('<IBBHII', 0x31574442, 3, kind, 0, rid, len(payload)) + payload

def record(service, session, version, stage, payload, slot=256, seq=2):
    b = bytearray(slot)
    struct.pack_into('<QQ16sQII', b, 0, seq, session, service.encode(), version, stage, len(payload))
    b[64:64 + len(payload)] = payload
    struct.pack_into('<I', b, 48, crc32c(bytes(b[8:48]) + payload))
    return bytes(b)

def put(target, name, data):
    os.makedirs(f'seeds/{target}', exist_ok=True)
    with open(f'seeds/{target}/{name}', 'wb') as f:
        f.write(data)

read = lambda g, h, o, n: frame(8, struct.pack('<IIQI', g, h, o, n))
write = lambda g, h, o, d: frame(10, struct.pack('<IIQ', g, h, o) + d)
cas = lambda g, h, o, e, n: frame(12, struct.pack('<IIQQQ', g, h, o, e, n))
faa = lambda g, h, o, a: frame(13, struct.pack('<IIQQ', g, h, o, a))
batch = lambda g, es: frame(15, struct.pack('<II', g, len(es)) + b''.join(struct.pack('<IIQ', h, n, o) for h, n, o in es))
# HELLO: role, VM name, then the 48-byte Noise handshake message.
hello = lambda role, vm: frame(1, bytes([role]) + struct.pack('<H', len(vm)) + vm + bytes(48))

# wire_server: mode byte (bit 0: requests, bit 1: repair role), then frames.
put('wire_server', 'handshake', b'\x00' + hello(2, b'fuzzvm'))
put('wire_server', 'read_requests', b'\x01' + read(1, 1, 0, 64) + batch(1, [(2, 8, 0), (1, 8, 64)]) + frame(6, b''))
put('wire_server', 'repair_requests', b'\x03' + write(1, 3, 8, b'patched!') + cas(1, 3, 16, 0, 5) + faa(1, 3, 24, 1) + write(1, 1, 0, b'x'))

# wire_client: mode 0 raw replies; mode 1: 16 op bytes, then the agent's frames after the handshake.
desc = {"vm": "fuzzvm", "generation": 1, "sealed": True, "tamper_count": 0, "role": "read",
        "backends": ["soft"], "vmm_alive": True,
        "hooks": [{"id": 1, "kind": "progress_box", "name": "progress", "len": 4096, "perms": 1}]}
welcome = frame(4, json.dumps(desc).encode())
put('wire_client', 'raw_replies', b'\x00' + welcome + frame(9, b'abcdefgh', 1) + frame(5, struct.pack('<HH', 5, 3) + b'oob') + frame(14, struct.pack('<Q', 7)))
ops = bytes([1, 0, 2, 0, 0, 3, 0]) + bytes(9)
put('wire_client', 'client_session', b'\x01' + ops + welcome + frame(9, b'\x11' * 1, 1) + frame(16, b'\x22', 2) + frame(7, json.dumps(desc).encode(), 3))

# device_mmio: 1 KiB of guest RAM (a descriptor at 0x100), then 8-byte ops:
# [op, offset lo, offset hi, width, value x4].
ram = bytearray(1024)
struct.pack_into('<QQIIII32s', ram, 0x100, 0x2000, 0x1000, 1, 1, 0, 0, b'progress')
struct.pack_into('<QQIIII32s', ram, 0x140, 0x10_0000, 0x4000, 3, 7, 0, 0, b'repair')
def op(kind, off, width, value):
    return struct.pack('<BHBI', kind, off, width, value)
ops = (op(3, 0, 0, 0x100) + op(4, 0, 0, 0) + op(0, 0x30, 2, 0) + op(3, 0, 0, 0x140) + op(4, 0, 0, 0)
       + op(4, 3, 0, 0) + op(4, 0, 0, 0) + op(1, 0x2c, 2, 2) + op(7, 0, 0, 0))
put('device_mmio', 'register_seal_tamper_reset', bytes(ram) + ops)

# records: one slot.
put('records', 'complete', record('shop', 2, 7, 3, b'items=3 total=12'))
put('records', 'mid_write', record('shop', 2, 7, 3, b'items=3 total=12', seq=3))

# extract: a state box header (64-byte header, 4 slots of 256) and records.
hdr = struct.pack('<IHHII', 0x42534442, 1, 64, 4, 256).ljust(64, b'\0')
put('extract', 'two_versions', hdr + record('shop', 1, 1, 1, b'items=1 total=1') + record('shop', 1, 2, 2, b'items=2 total=3')
    + record('shop', 2, 1, 1, b'x', seq=5) + record('kv', 9, 1, 0, b''))

# kernel_log: a ring header (16 descriptors, a 1-KiB data ring), then
# descriptors, infos and text of 1408 bytes each, one record in them.
hdr = bytearray(128)
struct.pack_into('<I', hdr, 0, 4)
struct.pack_into('<QQ', hdr, 24, 1, 1)
struct.pack_into('<I', hdr, 48, 10)
descs, infos, text = bytearray(1408), bytearray(1408), bytearray(1408)
struct.pack_into('<QQQ', descs, 24, (2 << 62) | 1, 0, 24)
struct.pack_into('<QQH', infos, 88, 7, 1000, 5)
struct.pack_into('<Q5s', text, 0, 1, b'hello')
put('kernel_log', 'one-record', bytes(hdr) + bytes(descs) + bytes(infos) + bytes(text))
