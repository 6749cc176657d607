"""Tests of the kvcache Python module against a real kvcached on loopback."""

import glob
import json
import os
import subprocess
import tempfile
import time
import unittest

import numpy as np

import kvcache

DAEMON = "kvstore/kvcached"


def start_daemon(*extra):
    """Starts kvcached on a free loopback port; returns (process, address)."""
    port_file = tempfile.mktemp(dir=os.environ.get("TEST_TMPDIR"))
    process = subprocess.Popen(
        [DAEMON, "--listen=127.0.0.1:0", f"--port_file={port_file}", *extra])
    deadline = time.time() + 30
    while time.time() < deadline:
        if os.path.exists(port_file):
            with open(port_file) as f:
                port = f.read().strip()
            if port:
                return process, f"127.0.0.1:{port}"
        if process.poll() is not None:
            raise RuntimeError("kvcached exited during start-up")
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("kvcached did not report its port")


def load_dump():
    """The first real KV dump: (manifest, fp16 array [layers, 2, tokens, ch])."""
    manifest_path = sorted(glob.glob("../kvdata/*.json") +
                           glob.glob("external/kvdata/*.json"))[0]
    with open(manifest_path) as f:
        manifest = json.load(f)
    kv = np.fromfile(
        os.path.join(os.path.dirname(manifest_path), manifest["kv_file"]),
        dtype="<f2")
    channels = manifest["kv_heads"] * manifest["head_dim"]
    return manifest, kv.reshape(manifest["layers"], 2, manifest["tokens"],
                                channels)


class KvcacheModuleTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.daemon, cls.address = start_daemon()
        cls.manifest, cls.kv = load_dump()

    @classmethod
    def tearDownClass(cls):
        cls.daemon.terminate()
        cls.daemon.wait(timeout=30)

    def setUp(self):
        self.client = kvcache.Client(self.address)

    def test_keys_chain_the_prefix(self):
        a = kvcache.chunk_keys(list(range(600)), "m", chunk_tokens=256)
        b = kvcache.chunk_keys(list(range(512)) + [7] * 88, "m",
                               chunk_tokens=256)
        self.assertEqual(len(a), 3)
        self.assertTrue(all(len(k) == 32 for k in a))
        self.assertEqual(a[:2], b[:2])
        self.assertNotEqual(a[2], b[2])
        other_model = kvcache.chunk_keys(list(range(600)), "m2",
                                         chunk_tokens=256)
        self.assertNotEqual(a[0], other_model[0])
        with self.assertRaises(kvcache.InvalidArgumentError):
            kvcache.chunk_keys([1, 2, 3], "")

    def test_store_and_restore_real_kv_through_the_daemon(self):
        m, kv = self.manifest, self.kv
        tokens = m["generation"]["token_ids"]
        keys = kvcache.chunk_keys(tokens, "stories260K", chunk_tokens=128,
                                  layers=m["layers"], kv_heads=m["kv_heads"],
                                  head_dim=m["head_dim"])
        chunks = [
            kvcache.encode(np.ascontiguousarray(kv[:, :, i * 128:(i + 1) * 128]),
                           m["kv_heads"], m["head_dim"], level="lossless")
            for i in range(len(keys))
        ]
        self.client.put(keys, chunks)
        # A new prompt sharing the first 300 tokens finds two cached chunks.
        prompt = kvcache.chunk_keys(tokens[:300] + [1] * 100, "stories260K",
                                    chunk_tokens=128, layers=m["layers"],
                                    kv_heads=m["kv_heads"],
                                    head_dim=m["head_dim"])
        found = self.client.lookup(prompt)
        self.assertEqual(found["prefix_chunks"], 2)
        self.assertEqual(found["chunks"][0]["tier"], "TIER_CPU")
        fetched = self.client.get(prompt[:2])
        restored = np.concatenate([kvcache.decode(c) for c in fetched], axis=2)
        np.testing.assert_array_equal(restored.view(np.uint16),
                                      kv[:, :, :256].view(np.uint16))

    def test_lossy_levels_are_smaller_and_close(self):
        m, kv = self.manifest, self.kv
        chunk = np.ascontiguousarray(kv[:, :, :256])
        sizes = {}
        for level in ["lossless", "near-lossless", "default"]:
            stream = kvcache.encode(chunk, m["kv_heads"], m["head_dim"],
                                    level=level)
            sizes[level] = len(stream)
            decoded = kvcache.decode(stream).astype(np.float32)
            original = chunk.astype(np.float32)
            error = (np.linalg.norm(decoded - original) /
                     np.linalg.norm(original))
            self.assertLess(error, 0.35, level)
        self.assertLess(sizes["default"], sizes["near-lossless"])
        self.assertLess(sizes["near-lossless"], sizes["lossless"])
        self.assertLess(sizes["default"] * 6, chunk.nbytes)
        self.assertEqual(
            kvcache.peek_shape(kvcache.encode(chunk, 4, 8)),
            {"layers": 5, "tokens": 256, "kv_heads": 4, "head_dim": 8,
             "dtype": "float16"})

    def test_bfloat16_round_trip_is_bit_exact(self):
        bits = (self.kv[:, :, :64].astype(np.float32).view(np.uint32) >>
                16).astype(np.uint16)
        stream = kvcache.encode(np.ascontiguousarray(bits), 4, 8,
                                level="lossless", dtype="bfloat16")
        np.testing.assert_array_equal(kvcache.decode(stream), bits)

    def test_pin_unpin_delete(self):
        keys = kvcache.chunk_keys(list(range(10)), "pins", chunk_tokens=5)
        self.client.put(keys, [b"a" * 100, b"b" * 100], pin_ttl_s=60)
        expiry = self.client.pin(keys, 120)
        self.assertGreater(expiry, time.time() + 100)
        self.assertTrue(self.client.lookup(keys)["chunks"][0]["pinned"])
        self.client.unpin(keys)
        self.assertFalse(self.client.lookup(keys)["chunks"][0]["pinned"])
        self.assertEqual(self.client.delete(keys), 2)
        self.assertEqual(self.client.lookup(keys)["prefix_chunks"], 0)
        self.assertGreaterEqual(self.client.stats()["bytes_in"], 200)

    def test_errors_are_typed(self):
        missing = kvcache.chunk_keys([42], "nothing-here", chunk_tokens=1)
        with self.assertRaises(kvcache.NotFoundError):
            self.client.get(missing)
        with self.assertRaises(KeyError):  # NotFoundError is a KeyError too
            self.client.get(missing)
        with self.assertRaises(kvcache.InvalidArgumentError):
            self.client.get([b"short"])
        with self.assertRaises(kvcache.InvalidArgumentError):
            self.client.put(missing, [])
        with self.assertRaises(kvcache.InvalidArgumentError):
            kvcache.encode(np.zeros((2, 2, 4, 32), np.float32), 4, 8)
        with self.assertRaises(kvcache.InvalidArgumentError):
            kvcache.encode(np.zeros((2, 2, 4, 30), np.float16), 4, 8)
        with self.assertRaises(kvcache.InvalidArgumentError):
            kvcache.encode(np.zeros((2, 2, 4, 32), np.float16), 4, 8,
                           level="extreme")
        stream = bytearray(kvcache.encode(np.ones((1, 2, 8, 32), np.float16),
                                          4, 8))
        stream[len(stream) // 2] ^= 0x10
        with self.assertRaises(kvcache.DataLossError):
            kvcache.decode(bytes(stream))
        with self.assertRaises(kvcache.DataLossError):
            kvcache.decode(bytes(stream[:20]))
        with self.assertRaises(kvcache.UnavailableError):
            kvcache.Client("127.0.0.1:1", connect_timeout_s=0.5)


if __name__ == "__main__":
    unittest.main()
