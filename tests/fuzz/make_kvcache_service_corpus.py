#!/usr/bin/env python3
"""Writes the seed corpus of the kvcache_service fuzz target.

Usage: tests/fuzz/make_kvcache_service_corpus.py [DIR]
       (default tests/fuzz/corpus/kvcache_service)

The input format is described at the top of kvstore/kvcache_service_fuzzer.cc;
each seed is a session a real client could run, so that mutations start deep
in the handlers (stored chunks, codec summaries, leases, pins, eviction).
"""
import os
import struct
import sys

(PUT, GET, LOOKUP, LOOKUP_EACH, LOCATE, RELEASE, PIN, UNPIN, DELETE, STATS,
 SEND_OVER_NCCL, NODE_INFO, TIER_USAGE, GET_CONFIG) = range(14)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def u8(v):
    return struct.pack("<B", v)


def u16(v):
    return struct.pack("<H", v)


def u32(v):
    return struct.pack("<I", v)


def u64(v):
    return struct.pack("<Q", v)


def key(k):
    """A well-formed key (k < 0xf0) or raw key bytes."""
    if isinstance(k, int):
        return u8(k)
    return u8(0xf0) + u8(len(k)) + k


def keys(*ks):
    return u8(len(ks)) + b"".join(key(k) for k in ks)


def whole_chunk(k, data=None, size=0, fill=None, pieces=1, pin_ms=None,
                replace=False, parent=None):
    """A Put message list entry: header and data pieces that match."""
    if fill is not None:
        form = 0x80 | (fill & 0x7C) | (pieces - 1)
        body = u16(size) + u8(form)
    else:
        body = u16(len(data)) + u8(pieces - 1) + data
    flags = (1 if pin_ms is not None else 0) | (2 if replace else 0) | (
        4 if parent is not None else 0)
    out = u8(0) + key(k) + body + u8(flags)
    if pin_ms is not None:
        out += u16(pin_ms)
    if parent is not None:
        out += key(parent)
    return out


def header(k, parent, size, crc, pin_ms=0, replace=0):
    return u8(1) + key(k) + key(parent) + u32(size) + u32(crc) + u32(pin_ms) + u8(replace)


def data(b):
    return u8(2) + u16(len(b)) + b


def put(*messages):
    return u8(PUT) + u8(len(messages)) + b"".join(messages)


def crc32c(b):
    crc = 0xFFFFFFFF
    for byte in b:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        ROOT, "tests/fuzz/corpus/kvcache_service")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(ROOT, "tests/fuzz/corpus/codec/valid_2x20x2x8_f16_default"), "rb") as f:
        codec_chunk = f.read()
    text = bytes(range(256)) * 4
    seeds = {
        "every_call": (
            put(whole_chunk(1, text, pieces=3), whole_chunk(2, text[:100], parent=1))
            + u8(GET) + keys(1, 2) + u8(LOOKUP) + keys(1, 2, 3)
            + u8(LOOKUP_EACH) + keys(3, 2) + u8(LOCATE) + keys(1, 2) + u32(60000) + u32(0) + u8(0)
            + u8(RELEASE) + u8(0) + u8(PIN) + keys(1) + u32(5000) + u8(UNPIN) + keys(1)
            + u8(DELETE) + keys(1, 2) + u8(STATS) + u8(SEND_OVER_NCCL) + u64(1) + keys(1) + u32(1 << 20)
            + u8(NODE_INFO) + u8(TIER_USAGE) + u8(GET_CONFIG)),
        "codec_chunk": (
            put(whole_chunk(7, codec_chunk, pieces=2, pin_ms=1000, parent=6))
            + u8(LOOKUP) + keys(7) + u8(GET) + keys(7) + u8(LOCATE) + keys(7) + u32(1000) + u32(1) + u8(1)),
        "hand_made_stream": (
            put(header(3, 2, 300, crc32c(text[:300])), data(text[:100]), data(text[100:300]),
                header(4, 3, 10, 0), data(text[:10]))
            + u8(GET) + keys(3, 4)),
        "replace_and_keep": (
            put(whole_chunk(5, text[:50])) + put(whole_chunk(5, text[50:120]))
            + put(whole_chunk(5, text[120:200], replace=True)) + u8(GET) + keys(5)),
        "malformed": (
            put(data(b"early"), u8(3), header(b"short", b"", 10, 0))
            + put(whole_chunk(9, size=20000, fill=0))
            + u8(GET) + keys(8, 8) + u8(LOOKUP) + keys(1, 2, 3, 4, 5)
            + u8(PIN) + keys(1) + u32(0) + u8(DELETE) + keys(b"\x00" * 33)
            + u8(RELEASE) + u8(0x80) + u64(12345)),
        "eviction": (
            b"".join(put(*(whole_chunk(10 + i, size=16000, fill=4 * i, pieces=2,
                                       pin_ms=100 if i < 2 else None)
                           for i in range(s, s + 5)))
                     for s in range(0, 25, 5))
            + u8(LOOKUP) + keys(10, 11) + u8(GET) + keys(34) + u8(TIER_USAGE)),
    }
    for name, seed in seeds.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(seed)


if __name__ == "__main__":
    main()
