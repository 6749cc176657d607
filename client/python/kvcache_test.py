"""Tests of the kvcache Python package (CPU paths) against a real kvcached on
loopback, through libkvcache.so."""

import ctypes
import os
import subprocess
import tempfile
import threading
import time
import unittest

import numpy as np

import kvcache
from kvcache_testing import load_dump, numpy_profile, start_daemon


def has_gpu():
    """Whether the CUDA runtime libkvcache.so links finds a GPU here."""
    try:
        cudart = ctypes.CDLL("libcudart.so.13")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return (cudart.cudaGetDeviceCount(ctypes.byref(count)) == 0 and
            count.value > 0)


def filled(arrays, bits=0xFFFF):
    """Arrays like `arrays`, every 16-bit value set to `bits`."""
    out = [np.empty_like(a) for a in arrays]
    for o in out:
        o.view(np.uint16)[...] = bits
    return out


class KvcacheTest(unittest.TestCase):

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
        self.assertEqual(self.client.cached_prefix(prompt), 2)
        self.assertEqual(self.client.cached_prefix(prompt[2:]), 0)
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

    def test_transform_levels_need_their_profile(self):
        m, kv = self.manifest, self.kv
        profile = kvcache.Profile.from_bytes(numpy_profile(kv, m))
        self.assertRegex(profile.id, "^[0-9a-f]{32}$")
        self.assertEqual(
            kvcache.Profile.from_bytes(profile.to_bytes()).id, profile.id)
        with self.assertRaises(kvcache.DataLossError):
            kvcache.Profile.from_bytes(profile.to_bytes()[:-4])
        chunk = np.ascontiguousarray(kv[:, :, 256:512])
        with self.assertRaises(kvcache.InvalidArgumentError):
            kvcache.encode(chunk, m["kv_heads"], m["head_dim"],
                           level="profile-balanced")
        stream = kvcache.encode(chunk, m["kv_heads"], m["head_dim"],
                                level="profile-balanced", profile=profile,
                                first_position=256)
        self.assertEqual(kvcache.stream_profile_id(stream), profile.id)
        self.assertIsNone(kvcache.stream_profile_id(
            kvcache.encode(chunk, m["kv_heads"], m["head_dim"])))
        with self.assertRaises(kvcache.FailedPreconditionError) as missing:
            kvcache.decode(stream)
        self.assertIn(profile.id, str(missing.exception))
        decoded = kvcache.decode(stream, profile).astype(np.float32)
        original = chunk.astype(np.float32)
        error = (np.linalg.norm(decoded - original) /
                 np.linalg.norm(original))
        self.assertGreater(error, 0)
        self.assertLess(error, 0.3)

    def test_profiles_are_kept_in_the_node(self):
        m, kv = self.manifest, self.kv
        profile = kvcache.Profile.from_bytes(numpy_profile(kv, m))
        with self.assertRaises(kvcache.NotFoundError):
            self.client.profile("py/profiled")
        self.client.publish_profile(profile, "py/profiled")
        with kvcache.Client(self.address) as other:
            self.assertEqual(other.profile("py/profiled").id, profile.id)
            self.assertEqual(
                other.profile("py/profiled", profile_id=profile.id).id,
                profile.id)
            with self.assertRaises(kvcache.NotFoundError):
                other.profile("py/profiled", name_space="another-tenant")

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

    def put_prompt(self, model_id, chunk_tokens=96, level="default",
                   profile=None):
        """Stores the dump's KV as a prompt's chunks; returns (keys, streams).

        512 tokens in chunks of 96: five full chunks and a last of 32.
        """
        m, kv = self.manifest, self.kv
        keys = kvcache.chunk_keys(m["generation"]["token_ids"], model_id,
                                  chunk_tokens=chunk_tokens,
                                  layers=m["layers"], kv_heads=m["kv_heads"],
                                  head_dim=m["head_dim"])
        streams = [
            kvcache.encode(np.ascontiguousarray(
                kv[:, :, i * chunk_tokens:(i + 1) * chunk_tokens]),
                           m["kv_heads"], m["head_dim"], level=level,
                           profile=profile, first_position=i * chunk_tokens)
            for i in range(len(keys))
        ]
        self.client.put(keys, streams)
        return keys, streams

    def test_fetch_decodes_transform_chunks_with_the_profile(self):
        self.client.publish_profile(
            kvcache.Profile.from_bytes(numpy_profile(self.kv, self.manifest)),
            "fetch-profiled")
        profile = self.client.profile("fetch-profiled")
        keys, streams = self.put_prompt("fetch-profiled",
                                        level="profile-fine", profile=profile)
        self.assertEqual(kvcache.stream_profile_id(streams[1]), profile.id)
        expected = [kvcache.decode(s, profile).view(np.uint16)
                    for s in streams]
        for transport in ("shared_memory", "grpc"):
            with self.assertRaises(kvcache.FailedPreconditionError) as missing:
                self.client.fetch(keys, filled(expected), transport=transport)
            self.assertIn(profile.id, str(missing.exception))
            out = filled(expected)
            self.client.fetch(keys, out, transport=transport, profile=profile)
            for i, (got, want) in enumerate(zip(out, expected)):
                np.testing.assert_array_equal(got, want,
                                              f"{transport} chunk {i}")
        with self.assertRaises(kvcache.InvalidArgumentError):
            self.client.fetch(keys, filled(expected), profile=profile.id)

    def test_fetch_into_numpy_is_bit_exact_over_each_transport(self):
        keys, streams = self.put_prompt("fetch-numpy")
        self.assertEqual(len(keys), 6)
        expected = [kvcache.decode(s) for s in streams]
        self.assertEqual(expected[-1].shape[2], 32)
        # This node runs on this host, so "auto" reads its memory in place.
        for transport, carrier in [("shared_memory", "shared_memory_chunks"),
                                   ("grpc", "grpc_chunks"),
                                   ("auto", "shared_memory_chunks")]:
            out = filled(expected)
            report = self.client.fetch(keys, out, transport=transport)
            self.assertEqual(report[carrier], len(keys), transport)
            self.assertEqual(
                report["shared_memory_chunks"] + report["grpc_chunks"],
                len(keys), transport)
            self.assertEqual(report["bytes"], sum(len(s) for s in streams))
            for i, (got, want) in enumerate(zip(out, expected)):
                np.testing.assert_array_equal(
                    got.view(np.uint16), want.view(np.uint16),
                    f"{transport} chunk {i}")
        # Decoding threads give the same values.
        out = filled(expected)
        self.client.fetch(keys, out, decode_threads=3)
        for got, want in zip(out, expected):
            np.testing.assert_array_equal(got.view(np.uint16),
                                          want.view(np.uint16))
        with self.assertRaises(kvcache.InvalidArgumentError):
            self.client.fetch(keys, filled(expected), decode_threads=0)
        # uint16 arrays take a float16 chunk's bits; a fetch of nothing is
        # nothing.
        out = filled([e.view(np.uint16) for e in expected])
        self.client.fetch(keys, out, lease_s=5)
        for got, want in zip(out, expected):
            np.testing.assert_array_equal(got, want.view(np.uint16))
        self.assertEqual(self.client.fetch([], []),
                         {"gpu_tier_chunks": 0, "shared_memory_chunks": 0,
                          "grpc_chunks": 0, "nccl_chunks": 0, "bytes": 0})

    def test_threads_fetch_through_one_client_at_once(self):
        keys, streams = self.put_prompt("fetch-threads")
        expected = [kvcache.decode(s).view(np.uint16) for s in streams]
        errors = []

        def fetch(transport):
            try:
                for _ in range(5):
                    out = filled(expected)
                    self.client.fetch(keys, out, transport=transport)
                    for got, want in zip(out, expected):
                        np.testing.assert_array_equal(got, want)
            except Exception as e:  # reported below, from the main thread
                errors.append(e)

        threads = [threading.Thread(target=fetch, args=(t,))
                   for t in ["auto", "auto", "grpc", "shared_memory"]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])

    def test_fetch_bfloat16_chunks_into_uint16(self):
        bits = (self.kv[:, :, :64].astype(np.float32).view(np.uint32) >>
                16).astype(np.uint16)
        keys = kvcache.chunk_keys(list(range(64)), "fetch-bf16",
                                  chunk_tokens=32, dtype="bfloat16")
        streams = [kvcache.encode(np.ascontiguousarray(bits[:, :, i:i + 32]),
                                  4, 8, level="default", dtype="bfloat16")
                   for i in (0, 32)]
        self.client.put(keys, streams)
        out = filled([np.empty((5, 2, 32, 32), np.uint16)] * 2)
        self.client.fetch(keys, out)
        for got, stream in zip(out, streams):
            np.testing.assert_array_equal(got, kvcache.decode(stream))
        # float16 arrays would misread bfloat16 bits.
        wrong = filled([np.empty((5, 2, 32, 32), np.float16)] * 2)
        with self.assertRaisesRegex(kvcache.InvalidArgumentError, "bfloat16"):
            self.client.fetch(keys, wrong)
        for w in wrong:
            self.assertTrue((w.view(np.uint16) == 0xFFFF).all())

    def test_fetch_of_a_missing_chunk_is_not_found(self):
        keys, streams = self.put_prompt("fetch-missing")
        self.client.delete(keys[3:4])
        out = filled([kvcache.decode(s) for s in streams])
        for transport in ["auto", "grpc"]:
            with self.assertRaises(kvcache.NotFoundError, msg=transport):
                self.client.fetch(keys, out, transport=transport)
        # Forced shared memory cannot lend it, missing or not.
        with self.assertRaises(kvcache.FailedPreconditionError):
            self.client.fetch(keys, out, transport="shared_memory")
        # NCCL needs a node with a GPU tier, and a GPU here.
        with self.assertRaisesRegex(kvcache.FailedPreconditionError,
                                    "NCCL transport asked for"):
            self.client.fetch(keys, out, transport="nccl")
        # The prefix before it is still there.
        self.client.fetch(keys[:3], out[:3])

    def test_wrong_out_arrays_are_refused_before_fetching(self):
        keys, streams = self.put_prompt("fetch-wrong-out")
        good = [kvcache.decode(s) for s in streams]
        transposed = np.empty(good[0].shape[::-1], np.float16).T
        read_only = np.empty_like(good[0])
        read_only.setflags(write=False)
        cases = {
            "too few": good[:-1],
            "float32": [g.astype(np.float32) for g in good],
            "3-d": [g[0] for g in good],
            "no K/V axis": [np.repeat(g, 2, axis=1) for g in good],
            "not C-contiguous": [transposed] + good[1:],
            "read-only": [read_only] + good[1:],
            "other layers": good[:2] + [good[2][:4].copy()] + good[3:],
            "not an array": [g.tolist() for g in good[:1]] + good[1:],
        }
        before = self.client.stats()["bytes_out"]
        for name, out in cases.items():
            with self.assertRaises(kvcache.InvalidArgumentError, msg=name):
                self.client.fetch(keys, out, transport="grpc")
        self.assertEqual(self.client.stats()["bytes_out"], before)
        # Same sizes, other shape: only the chunks' headers show it, and the
        # first chunk is checked before it is decoded.
        for transport in ["shared_memory", "grpc"]:
            wrong = filled([g.reshape(g.shape[0], 2, g.shape[2] // 2, -1)
                            for g in good])
            with self.assertRaisesRegex(kvcache.InvalidArgumentError,
                                        "chunk 0 is \\[5, 2, 96, 32\\]"):
                self.client.fetch(keys, wrong, transport=transport)
            for w in wrong:
                self.assertTrue((w.view(np.uint16) == 0xFFFF).all())
        with self.assertRaises(kvcache.InvalidArgumentError):
            self.client.fetch(keys, filled(good), transport="carrier pigeon")
        with self.assertRaises(kvcache.InvalidArgumentError):
            self.client.fetch(keys, filled(good), lease_s=0)

    def test_device_addresses_come_from_any_array_protocol(self):
        array = np.arange(64, dtype=np.float16)

        class Torchlike:
            def data_ptr(self):
                return 0x7f0000001000

        class Cupylike:
            __cuda_array_interface__ = {"data": (0x7f0000002000, False)}

        address = kvcache._address  # pylint: disable=protected-access
        self.assertEqual(address(0x7f0000000000, "x"), 0x7f0000000000)
        self.assertEqual(address(np.uint64(4096), "x"), 4096)
        self.assertEqual(address(Torchlike(), "x"), 0x7f0000001000)
        self.assertEqual(address(Cupylike(), "x"), 0x7f0000002000)
        # NumPy arrays speak DLPack.
        self.assertEqual(address(array, "x"), array.ctypes.data)
        self.assertEqual(address(array[8:], "x"), array.ctypes.data + 16)
        for bad in [0, -1, 2**64, "0x10", None]:
            with self.assertRaises(kvcache.InvalidArgumentError, msg=bad):
                address(bad, "x")

    def test_fetch_to_device_checks_its_arguments_then_needs_a_gpu(self):
        if has_gpu():
            self.skipTest("a GPU is here: kvcache_gpu_test.py covers it")
        keys, _ = self.put_prompt("fetch-no-gpu")
        layout = dict(layers=5, kv_heads=4, head_dim=8)
        blocks = [{"tokens": 96, "values": 0x7f0000000000 + i * (1 << 20)}
                  for i in range(len(keys))]
        blocks[-1]["tokens"] = 32
        # Malformed arguments are InvalidArgumentError, GPU or not.
        paged = dict(layout, kind="paged", block_tokens=16, num_blocks=64)
        for name, args, kwargs in [
            ("no blocks", (keys, layout), {}),
            ("too few blocks", (keys, layout, blocks[:-1]), {}),
            ("unknown field", (keys, dict(layout, heads=4), blocks), {}),
            ("no layers", (keys, dict(kv_heads=4, head_dim=8), blocks), {}),
            ("twice", (keys, layout, blocks), {"layers": 5}),
            ("bad kind", (keys, dict(layout, kind="ragged"), blocks), {}),
            ("bad dtype", (keys, dict(layout, dtype="fp8"), blocks), {}),
            ("null values", (keys, layout,
                             blocks[:-1] + [{"tokens": 32, "values": 0}]), {}),
            ("no tokens", (keys, layout,
                           blocks[:-1] + [{"values": 1 << 40}]), {}),
            ("paged, no base", (keys, paged,
                                [{"tokens": 96, "block_ids": list(range(6))}]
                                * len(keys)), {}),
            ("paged, values", (keys, dict(paged, base=1 << 40), blocks), {}),
            ("short block table",
             (keys, dict(paged, base=1 << 40),
              [{"tokens": 96, "block_ids": [0, 1, 2]}] * len(keys)), {}),
            ("block id past the cache",
             (keys, dict(paged, base=1 << 40),
              [{"tokens": 96, "block_ids": [0, 1, 2, 3, 4, 64]}] * len(keys)),
             {}),
            ("bad transport", (keys, layout, blocks), {"transport": "smoke"}),
        ]:
            with self.assertRaises(kvcache.InvalidArgumentError, msg=name):
                self.client.fetch_to_device(*args, **kwargs)
        # Well-formed, as a dict or as keyword arguments: no GPU to decode on.
        with self.assertRaisesRegex(kvcache.FailedPreconditionError,
                                    "needs a CUDA GPU"):
            self.client.fetch_to_device(keys, layout, blocks)
        with self.assertRaises(kvcache.FailedPreconditionError):
            self.client.fetch_to_device(
                keys, blocks=[{"tokens": 96, "block_ids": list(range(6)),
                               "first_slot": 0}] * len(keys),
                stream=12345, transport="grpc", kind="paged", layers=5,
                kv_heads=4, head_dim=8, block_tokens=16, num_blocks=64,
                layer_bases=[1 << 40] * 5)
        # The CPU path goes on working.
        report = self.client.fetch(
            keys[:1], filled([np.empty((5, 2, 96, 32), np.float16)]))
        self.assertGreater(report["bytes"], 0)

    def test_storer_checks_its_arguments_then_needs_a_gpu(self):
        if has_gpu():
            self.skipTest("a GPU is here: kvcache_gpu_test.py covers it")
        layout = dict(layers=5, kv_heads=4, head_dim=8)
        for name, kwargs in [
            ("no layers", dict(kv_heads=4, head_dim=8)),
            ("bad level", dict(layout, level="smallest")),
            ("no chunk tokens", dict(layout, chunk_tokens=0)),
            ("no slots", dict(layout, slots=0)),
            ("paged, no base", dict(layout, kind="paged", block_tokens=16,
                                    num_blocks=64)),
        ]:
            with self.assertRaises(kvcache.InvalidArgumentError, msg=name):
                self.client.storer(**kwargs)
        with self.assertRaisesRegex(kvcache.FailedPreconditionError,
                                    "storer needs a CUDA GPU"):
            self.client.storer(layout, level="high")


class TlsTest(unittest.TestCase):
    """Client over mutual TLS, with certificates deploy/make_certs.sh makes."""

    @classmethod
    def setUpClass(cls):
        cls.certs = os.path.join(
            os.environ.get("TEST_TMPDIR", tempfile.gettempdir()), "py-certs")
        subprocess.run(["deploy/make_certs.sh", cls.certs, "--node", "node",
                        "--client", "worker"], check=True)
        c = cls.certs
        cls.daemon, cls.address = start_daemon(
            f'--set=tls {{ cert_file: "{c}/node.crt" key_file: '
            f'"{c}/node.key" ca_file: "{c}/ca.crt" '
            'require_client_certificate: true }')

    @classmethod
    def tearDownClass(cls):
        cls.daemon.terminate()
        cls.daemon.wait(timeout=30)

    def path(self, name):
        return os.path.join(self.certs, name)

    def test_put_and_get_over_mutual_tls(self):
        client = kvcache.Client(self.address, ca_file=self.path("ca.crt"),
                                cert_file=self.path("worker.crt"),
                                key_file=self.path("worker.key"),
                                token="t0ken")
        keys = kvcache.chunk_keys(list(range(8)), "tls", chunk_tokens=8)
        client.put(keys, [b"x" * 4096])
        self.assertEqual(client.lookup(keys)["prefix_chunks"], 1)

    def test_errors_name_the_credential(self):
        with self.assertRaisesRegex(kvcache.UnavailableError,
                                    "TLS handshake with .* failed"):
            kvcache.Client(self.address, connect_timeout_s=2,
                           ca_file=self.path("ca.crt"))
        with self.assertRaisesRegex(kvcache.NotFoundError, "ca_file"):
            kvcache.Client(self.address, ca_file=self.path("missing.crt"))
        with self.assertRaisesRegex(kvcache.NotFoundError, "token_file"):
            kvcache.Client(self.address, ca_file=self.path("ca.crt"),
                           token_file=self.path("missing-token"))


if __name__ == "__main__":
    unittest.main()
