"""Client.fetch_to_device against a real kvcached, on a GPU host.

Needs a CUDA GPU, so CI does not run it. tests/gpu/run.sh runs it on a GPU
host with that host's Python and the kvcache wheel; on a GPU host that
builds:

  bazel run //client/python:kvcache_gpu_test

Device memory comes from the CUDA runtime through ctypes (no PyTorch
needed). Every restore is copied back and compared bit for bit with
kvcache.decode() of the same stream.
"""

import ctypes
import ctypes.util
import unittest

import numpy as np

import kvcache
from kvcache_testing import load_dump, numpy_profile, start_daemon

CHUNK_TOKENS = 96  # 512 tokens: five chunks of 96 and a last one of 32
BLOCK_TOKENS = 16
NUM_BLOCKS = 48  # of which a prompt's 512 tokens take 32


class Cuda:
    """The few CUDA runtime calls the test needs, through ctypes."""

    H2D, D2H = 1, 2

    def __init__(self):
        # The runtime the module loaded, if it is found by that name.
        names = ["libcudart.so.13", "libcudart.so.12", "libcudart.so",
                 "/usr/local/cuda/lib64/libcudart.so",
                 ctypes.util.find_library("cudart")]
        for name in filter(None, names):
            try:
                self.lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        else:
            raise RuntimeError("no libcudart.so found")
        lib = self.lib
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        lib.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p),
                                   ctypes.c_size_t]
        lib.cudaFree.argtypes = [ctypes.c_void_p]
        lib.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p,
                                   ctypes.c_size_t, ctypes.c_int]
        lib.cudaMemset.argtypes = [ctypes.c_void_p, ctypes.c_int,
                                   ctypes.c_size_t]
        lib.cudaStreamCreate.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        lib.cudaStreamDestroy.argtypes = [ctypes.c_void_p]
        lib.cudaStreamSynchronize.argtypes = [ctypes.c_void_p]
        self.allocations = []

    def check(self, error, what):
        if error != 0:
            raise RuntimeError(
                f"{what}: {self.lib.cudaGetErrorString(error).decode()}")

    def device_count(self):
        count = ctypes.c_int(0)
        if self.lib.cudaGetDeviceCount(ctypes.byref(count)) != 0:
            return 0
        return count.value

    def malloc(self, nbytes, fill=0xFF):
        """Device memory, every byte `fill`; freed by free_all()."""
        ptr = ctypes.c_void_p()
        self.check(self.lib.cudaMalloc(ctypes.byref(ptr), nbytes),
                   "cudaMalloc")
        self.allocations.append(ptr.value)
        self.check(self.lib.cudaMemset(ptr.value, fill, nbytes), "cudaMemset")
        return ptr.value

    def upload(self, array):
        array = np.ascontiguousarray(array)
        ptr = self.malloc(array.nbytes)
        self.check(self.lib.cudaMemcpy(ptr, array.ctypes.data, array.nbytes,
                                       self.H2D), "cudaMemcpy to device")
        return ptr

    def download(self, ptr, shape, dtype):
        out = np.empty(shape, dtype)
        self.check(self.lib.cudaMemcpy(out.ctypes.data, ptr, out.nbytes,
                                       self.D2H), "cudaMemcpy to host")
        return out

    def free_all(self):
        for ptr in self.allocations:
            self.lib.cudaFree(ptr)
        self.allocations = []

    def synchronize(self, stream):
        self.check(self.lib.cudaStreamSynchronize(stream),
                   "cudaStreamSynchronize")

    def stream(self):
        stream = ctypes.c_void_p()
        self.check(self.lib.cudaStreamCreate(ctypes.byref(stream)),
                   "cudaStreamCreate")
        return stream.value


def paged_values(caches, table, tokens):
    """[layers, 2, tokens, C] gathered from per-layer paged caches
    [num_blocks, 2, BLOCK_TOKENS, C], token t in slot t of `table`."""
    slots = np.arange(tokens)
    blocks = np.asarray(table)[slots // BLOCK_TOKENS]
    offsets = slots % BLOCK_TOKENS
    # Advanced indices around a slice put the token axis first.
    return np.stack([c[blocks, :, offsets, :].transpose(1, 0, 2)
                     for c in caches])


class FetchToDeviceTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.cuda = Cuda()
        if cls.cuda.device_count() == 0:
            raise RuntimeError("this test needs a CUDA GPU; none found")
        cls.daemon, cls.address = start_daemon()
        cls.manifest, cls.kv = load_dump()
        cls.client = kvcache.Client(cls.address)

    @classmethod
    def tearDownClass(cls):
        cls.daemon.terminate()
        cls.daemon.wait(timeout=30)

    def tearDown(self):
        self.cuda.free_all()

    def layout(self, **fields):
        m = self.manifest
        return dict(layers=m["layers"], kv_heads=m["kv_heads"],
                    head_dim=m["head_dim"], **fields)

    def contiguous_blocks(self, wanted):
        """A filled device buffer per chunk of `wanted`, and the blocks
        argument that restores each chunk into its own."""
        buffers = [self.cuda.malloc(w.nbytes) for w in wanted]
        return buffers, [{"tokens": w.shape[2], "values": b}
                         for w, b in zip(wanted, buffers)]

    def expect_restored(self, wanted, buffers, what):
        for i, (w, b) in enumerate(zip(wanted, buffers)):
            np.testing.assert_array_equal(
                self.cuda.download(b, w.shape, np.uint16), w,
                f"{what}chunk {i}")

    def put_prompt(self, model_id, dtype="float16", level="default",
                   profile=None):
        """Stores the dump as a prompt's chunks; returns (keys, streams,
        expected [layers, 2, tokens, C] of the whole prompt)."""
        m, kv = self.manifest, self.kv
        values = kv
        if dtype == "bfloat16":
            values = (kv.astype(np.float32).view(np.uint32) >> 16).astype(
                np.uint16)
        keys = kvcache.chunk_keys(m["generation"]["token_ids"], model_id,
                                  chunk_tokens=CHUNK_TOKENS, dtype=dtype,
                                  layers=m["layers"], kv_heads=m["kv_heads"],
                                  head_dim=m["head_dim"])
        streams = [
            kvcache.encode(np.ascontiguousarray(
                values[:, :, i * CHUNK_TOKENS:(i + 1) * CHUNK_TOKENS]),
                           m["kv_heads"], m["head_dim"], level=level,
                           dtype=dtype, profile=profile,
                           first_position=i * CHUNK_TOKENS)
            for i in range(len(keys))
        ]
        self.client.put(keys, streams)
        expected = np.concatenate(
            [kvcache.decode(s, profile).view(np.uint16) for s in streams],
            axis=2)
        return keys, streams, expected

    def test_transform_chunks_restore_with_the_profile(self):
        profile = kvcache.Profile.from_bytes(
            numpy_profile(self.kv, self.manifest))
        keys, streams, _ = self.put_prompt(
            "gpu-profiled", level="profile-balanced", profile=profile)
        self.assertEqual(kvcache.stream_profile_id(streams[0]), profile.id)
        wanted = [kvcache.decode(s, profile).view(np.uint16) for s in streams]
        for transport in ("shared_memory", "grpc"):
            buffers, blocks = self.contiguous_blocks(wanted)
            with self.assertRaises(kvcache.FailedPreconditionError):
                self.client.fetch_to_device(keys, self.layout(), blocks,
                                            transport=transport)
            for i, (w, b) in enumerate(zip(wanted, buffers)):
                self.assertTrue(
                    (self.cuda.download(b, w.shape, np.uint16) == 0xFFFF)
                    .all(), f"{transport}: chunk {i} written without its "
                    "profile")
            self.client.fetch_to_device(keys, self.layout(), blocks,
                                        transport=transport, profile=profile)
            self.expect_restored(wanted, buffers, f"{transport} ")

    def test_contiguous_restore_is_bit_exact_over_each_transport(self):
        keys, streams, _ = self.put_prompt("gpu-contiguous")
        wanted = [kvcache.decode(s).view(np.uint16) for s in streams]
        for transport, carrier in [("shared_memory", "shared_memory_chunks"),
                                   ("grpc", "grpc_chunks"),
                                   ("auto", "shared_memory_chunks")]:
            buffers, blocks = self.contiguous_blocks(wanted)
            report = self.client.fetch_to_device(keys, self.layout(), blocks,
                                                 transport=transport)
            self.assertEqual(report[carrier], len(keys), transport)
            self.assertEqual(report["bytes"], sum(len(s) for s in streams))
            self.assertGreater(report["first_batch_ms"], 0)
            self.expect_restored(wanted, buffers, f"{transport} ")

    def test_layer_by_layer_signals_each_layer_when_it_is_there(self):
        keys, streams, _ = self.put_prompt("gpu-layered")
        wanted = [kvcache.decode(s).view(np.uint16) for s in streams]
        layers = self.manifest["layers"]
        fetch_stream, compute = self.cuda.stream(), self.cuda.stream()
        for transport in ("shared_memory", "grpc"):
            buffers, blocks = self.contiguous_blocks(wanted)
            signalled = []

            def on_layer(layer, event):
                signalled.append(layer)
                # The engine's stream waits for the layer; once it has
                # passed, the layer is there in every chunk.
                kvcache.wait_event(compute, event)
                self.cuda.synchronize(compute)
                for i, (w, b) in enumerate(zip(wanted, buffers)):
                    np.testing.assert_array_equal(
                        self.cuda.download(b + layer * w[0].nbytes,
                                           w[layer].shape, np.uint16),
                        w[layer], f"{transport} chunk {i} layer {layer}")

            report = self.client.fetch_to_device(
                keys, self.layout(), blocks, stream=fetch_stream,
                transport=transport, on_layer=on_layer)
            self.assertEqual(signalled, list(range(layers)), transport)
            self.assertGreater(report["first_batch_ms"], 0)
            self.expect_restored(wanted, buffers, f"{transport} ")

        # What on_layer raises comes out of the call; the restore completes.
        buffers, blocks = self.contiguous_blocks(wanted)

        def fail(layer, event):
            raise ValueError(f"layer {layer}")

        with self.assertRaisesRegex(ValueError, "layer 0"):
            self.client.fetch_to_device(keys, self.layout(), blocks,
                                        on_layer=fail)
        self.expect_restored(wanted, buffers, "")
        with self.assertRaises(kvcache.InvalidArgumentError):
            self.client.fetch_to_device(keys, self.layout(), blocks,
                                        on_layer="layer")
        with self.assertRaises(kvcache.InvalidArgumentError):
            kvcache.wait_event(compute, 0)

    def test_paged_per_layer_cache_from_host_lists_on_a_stream(self):
        keys, _, expected = self.put_prompt("gpu-paged-per-layer")
        layers, _, tokens, channels = expected.shape
        cache_shape = (NUM_BLOCKS, 2, BLOCK_TOKENS, channels)
        table = np.random.default_rng(7).permutation(NUM_BLOCKS).tolist()
        stream = self.cuda.stream()
        for bases_on_gpu in [False, True]:
            caches = [self.cuda.malloc(2 * int(np.prod(cache_shape)))
                      for _ in range(layers)]
            layer_bases = caches
            table_arg = table
            if bases_on_gpu:  # as data_ptr() of CUDA tensors would give
                layer_bases = self.cuda.upload(np.array(caches, np.uint64))
                table_arg = self.cuda.upload(np.array(table, np.int32))
            # One block table for the request; chunk i starts at its slot.
            blocks = [{"tokens": min(CHUNK_TOKENS, tokens - i * CHUNK_TOKENS),
                       "block_ids": table_arg,
                       "first_slot": i * CHUNK_TOKENS}
                      for i in range(len(keys))]
            report = self.client.fetch_to_device(
                keys, blocks=blocks, stream=stream, kind="paged",
                layer_bases=layer_bases, block_tokens=BLOCK_TOKENS,
                num_blocks=NUM_BLOCKS, **self.layout())
            self.assertEqual(report["shared_memory_chunks"], len(keys))
            restored = [self.cuda.download(c, cache_shape, np.uint16)
                        for c in caches]
            np.testing.assert_array_equal(
                paged_values(restored, table, tokens), expected)
            # Blocks outside the table stay as they were.
            unused = sorted(set(range(NUM_BLOCKS)) -
                            set(table[:tokens // BLOCK_TOKENS]))
            for r in restored:
                self.assertTrue((r[unused] == 0xFFFF).all())

    def test_paged_layer_major_bfloat16_with_device_block_ids(self):
        keys, _, expected = self.put_prompt("gpu-layer-major", "bfloat16")
        layers, _, tokens, channels = expected.shape
        shape = (layers, NUM_BLOCKS, 2, BLOCK_TOKENS, channels)
        base = self.cuda.malloc(2 * int(np.prod(shape)))
        table = np.random.default_rng(8).permutation(NUM_BLOCKS)
        per_chunk = CHUNK_TOKENS // BLOCK_TOKENS
        blocks = []
        for i in range(len(keys)):
            n = min(CHUNK_TOKENS, tokens - i * CHUNK_TOKENS)
            ids = table[i * per_chunk:i * per_chunk + -(-n // BLOCK_TOKENS)]
            blocks.append({"tokens": n, "block_ids": self.cuda.upload(
                ids.astype(np.int32))})
        layout = self.layout(kind="paged", dtype="bfloat16", base=base,
                             block_tokens=BLOCK_TOKENS, num_blocks=NUM_BLOCKS)
        report = self.client.fetch_to_device(keys, layout, blocks,
                                             transport="grpc")
        self.assertEqual(report["grpc_chunks"], len(keys))
        restored = self.cuda.download(base, shape, np.uint16)
        np.testing.assert_array_equal(
            paged_values(list(restored), table, tokens), expected)

    def test_errors(self):
        keys, streams, _ = self.put_prompt("gpu-errors")
        wanted = [kvcache.decode(s).view(np.uint16) for s in streams]
        buffers, blocks = self.contiguous_blocks(wanted)
        # float16 chunks into a bfloat16 cache: the GPU refuses each chunk
        # and leaves its blocks as they were.
        with self.assertRaisesRegex(kvcache.DataLossError, "shape"):
            self.client.fetch_to_device(keys, self.layout(dtype="bfloat16"),
                                        blocks)
        for w, b in zip(wanted, buffers):
            self.assertTrue(
                (self.cuda.download(b, w.shape, np.uint16) == 0xFFFF).all())
        # Host memory (a CPU tensor's data_ptr()) is refused up front.
        host = np.empty_like(wanted[0])
        with self.assertRaisesRegex(kvcache.InvalidArgumentError,
                                    "not GPU memory"):
            self.client.fetch_to_device(
                keys, self.layout(),
                [{"tokens": 96, "values": host.ctypes.data}] + blocks[1:])
        missing = kvcache.chunk_keys(list(range(96)), "gpu-nothing-here",
                                     chunk_tokens=CHUNK_TOKENS)
        with self.assertRaises(kvcache.NotFoundError):
            self.client.fetch_to_device(missing, self.layout(), blocks[:1])
        # The right layout still restores after all that.
        self.client.fetch_to_device(keys, self.layout(), blocks)
        for w, b in zip(wanted, buffers):
            np.testing.assert_array_equal(
                self.cuda.download(b, w.shape, np.uint16), w)

    def chunks_of_dump(self, model_id):
        """The dump's chunks [layers, 2, tokens, C] (fp16), and their keys."""
        m, kv = self.manifest, self.kv
        keys = kvcache.chunk_keys(m["generation"]["token_ids"], model_id,
                                  chunk_tokens=CHUNK_TOKENS,
                                  layers=m["layers"], kv_heads=m["kv_heads"],
                                  head_dim=m["head_dim"])
        chunks = [np.ascontiguousarray(
            kv[:, :, i * CHUNK_TOKENS:(i + 1) * CHUNK_TOKENS])
                  for i in range(len(keys))]
        return keys, chunks

    def cpu_streams(self, chunks, level):
        m = self.manifest
        return [kvcache.encode(c, m["kv_heads"], m["head_dim"], level=level)
                for c in chunks]

    def test_storer_stores_what_the_cpu_encoder_writes(self):
        keys, chunks = self.chunks_of_dump("gpu-store-contiguous")
        storer = self.client.storer(self.layout(), level="high",
                                    chunk_tokens=CHUNK_TOKENS, batch_chunks=4)
        self.assertGreater(storer.device_bytes, 0)
        buffers = [self.cuda.upload(c) for c in chunks]
        ticket = storer.store(keys, [{"tokens": c.shape[2], "values": b}
                                     for c, b in zip(chunks, buffers)])
        report = storer.wait(ticket)
        want = self.cpu_streams(chunks, "high")
        self.assertEqual(report["chunks"], len(keys))
        self.assertEqual(report["raw_bytes"], sum(c.nbytes for c in chunks))
        self.assertEqual(report["stored_bytes"], sum(len(w) for w in want))
        self.assertEqual(self.client.get(keys), want)
        self.assertEqual(self.client.lookup(keys)["prefix_chunks"], len(keys))
        with self.assertRaises(kvcache.InvalidArgumentError):
            storer.wait(ticket)  # waited for already

    def test_storer_reads_a_paged_cache_on_a_stream(self):
        keys, chunks = self.chunks_of_dump("gpu-store-paged")
        layers, _, _, channels = chunks[0].shape
        tokens = sum(c.shape[2] for c in chunks)
        prompt = np.concatenate(chunks, axis=2)
        table = np.random.default_rng(9).permutation(NUM_BLOCKS).tolist()
        # Scatter the prompt into per-layer caches [num_blocks, 2,
        # BLOCK_TOKENS, C], token t at slot t of the table.
        caches = np.full((layers, NUM_BLOCKS, 2, BLOCK_TOKENS, channels),
                         0xFFFF, np.uint16)
        for t in range(tokens):
            caches[:, table[t // BLOCK_TOKENS], :, t % BLOCK_TOKENS] = (
                prompt[:, :, t].view(np.uint16))
        layer_bases = [self.cuda.upload(c) for c in caches]
        storer = self.client.storer(
            kind="paged", layer_bases=layer_bases, block_tokens=BLOCK_TOKENS,
            num_blocks=NUM_BLOCKS, level="default", chunk_tokens=CHUNK_TOKENS,
            **self.layout())
        blocks = [{"tokens": c.shape[2], "block_ids": table,
                   "first_slot": i * CHUNK_TOKENS}
                  for i, c in enumerate(chunks)]
        stream = self.cuda.stream()
        first, rest = keys[:2], keys[2:]
        t1 = storer.store(first, blocks[:2], stream=stream)
        t2 = storer.store(rest, blocks[2:], stream=stream, parent=first[-1],
                          pin_ttl_s=60)
        self.assertEqual(storer.wait(t2)["chunks"], len(rest))
        self.assertEqual(storer.wait(t1)["chunks"], len(first))
        self.assertEqual(self.client.get(keys),
                         self.cpu_streams(chunks, "default"))
        found = self.client.lookup(keys)
        self.assertTrue(all(c["pinned"] for c in found["chunks"][2:]))
        self.assertFalse(found["chunks"][0]["pinned"])

    def test_storer_errors(self):
        keys, chunks = self.chunks_of_dump("gpu-store-errors")
        layers, _, _, channels = chunks[0].shape
        base = self.cuda.malloc(
            2 * layers * NUM_BLOCKS * 2 * BLOCK_TOKENS * channels)
        storer = self.client.storer(
            kind="paged", base=base, block_tokens=BLOCK_TOKENS,
            num_blocks=NUM_BLOCKS, chunk_tokens=CHUNK_TOKENS, **self.layout())
        # Longer than the storer's chunks.
        with self.assertRaisesRegex(kvcache.InvalidArgumentError,
                                    "chunk_tokens"):
            storer.store(keys[:1], [{"tokens": CHUNK_TOKENS + 16,
                                     "block_ids": list(range(7))}])
        # A device block table naming a block outside the cache: found by
        # the GPU, so wait() says which chunk, and no later one is stored.
        per_chunk = CHUNK_TOKENS // BLOCK_TOKENS
        ids = np.arange(3 * per_chunk, dtype=np.int32)
        ids[per_chunk + 2] = NUM_BLOCKS + 5
        device_ids = self.cuda.upload(ids)
        ticket = storer.store(keys[:3], [
            {"tokens": CHUNK_TOKENS, "block_ids": device_ids,
             "first_slot": i * CHUNK_TOKENS} for i in range(3)])
        with self.assertRaisesRegex(kvcache.InvalidArgumentError, "chunk 1"):
            storer.wait(ticket)
        self.assertEqual(self.client.lookup(keys[:3])["prefix_chunks"], 1)


if __name__ == "__main__":
    unittest.main()
