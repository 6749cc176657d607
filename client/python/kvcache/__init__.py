"""kvcache: store and fetch LLM KV-cache chunks by prompt prefix.

chunk_keys() names a prompt's chunks; Client talks to a kvcached node (put,
lookup, and fetch or fetch_to_device to restore a prefix; storer to store
straight from the GPU); encode()/decode() compress chunks with kvcache's
codec. kvcache.hf saves and restores Hugging Face transformers caches.

Pure Python over libkvcache.so (kvcache's C ABI), so one build serves every
CPython from 3.9 on. Every call that talks to the node or the GPU releases
the GIL. Errors are typed (NotFoundError, ...) and carry the node's message.
NumPy is needed only by the calls that take or return arrays.
"""

import ctypes
import operator

from kvcache import _native
from kvcache._native import (DataLossError, Error, FailedPreconditionError,
                             InvalidArgumentError, NotFoundError,
                             PermissionDeniedError, ResourceExhaustedError,
                             UnauthenticatedError, UnavailableError)

__all__ = [
    "ABI_VERSION", "Client", "DataLossError", "Error",
    "FailedPreconditionError", "InvalidArgumentError", "NotFoundError",
    "PermissionDeniedError", "Profile", "ResourceExhaustedError", "Storer",
    "UnauthenticatedError", "UnavailableError", "chunk_keys", "decode",
    "encode", "peek_shape", "stream_profile_id", "wait_event"
]

ABI_VERSION = _native.ABI_VERSION
_lib = _native.lib
_check = _native.check

_U32 = 2**32 - 1
_TRANSPORTS = {"auto": 0, "shared_memory": 1, "grpc": 2, "nccl": 3}
_DTYPES = {"float16": 0, "bfloat16": 1}
_KINDS = {"contiguous": 0, "paged": 1}
_LAYOUT_FIELDS = ("kind", "layers", "kv_heads", "head_dim", "dtype",
                  "layer_bases", "base", "layer_stride", "block_stride",
                  "kv_stride", "token_stride", "block_tokens", "num_blocks")
_BLOCK_FIELDS = ("tokens", "values", "block_ids", "first_slot")


def _numpy():
    try:
        import numpy
    except ImportError as e:
        raise ImportError("this kvcache call takes or returns NumPy arrays; "
                          "pip install numpy") from e
    return numpy


def _int(value, what, low, high):
    """An int (or anything with __index__) in [low, high]."""
    try:
        v = operator.index(value)
    except TypeError:
        raise InvalidArgumentError(
            f"{what} must be an int, not {type(value).__name__}") from None
    if not low <= v <= high:
        raise InvalidArgumentError(f"{what} is {v}, not in [{low}, {high}]")
    return v


def _text(value):
    return None if value is None else str(value).encode()


def _keys(keys):
    """keys (a list of 32-byte bytes) as one contiguous bytes object."""
    keys = list(keys)
    for i, key in enumerate(keys):
        if not isinstance(key, (bytes, bytearray)) or len(key) != 32:
            raise InvalidArgumentError(
                f"keys[{i}] is not a 32-byte chunk key (from chunk_keys())")
    return b"".join(bytes(k) for k in keys), len(keys)


def _dlpack_address(capsule):
    """The data address a DLPack capsule ("dltensor") holds."""
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype = ctypes.c_void_p
    get.argtypes = [ctypes.py_object, ctypes.c_char_p]
    managed = get(capsule, b"dltensor")

    # DLManagedTensor starts with a DLTensor: data, device, ndim, dtype,
    # shape, strides, byte_offset.
    class _DLTensor(ctypes.Structure):
        _fields_ = [("data", ctypes.c_void_p), ("device_type", ctypes.c_int32),
                    ("device_id", ctypes.c_int32), ("ndim", ctypes.c_int32),
                    ("dtype", ctypes.c_uint32),
                    ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                    ("byte_offset", ctypes.c_uint64)]

    tensor = _DLTensor.from_address(managed)
    return (tensor.data or 0) + tensor.byte_offset


def _address(value, what):
    """A device address: an int (data_ptr()), a tensor with data_ptr(), an
    object with __cuda_array_interface__, or one with __dlpack__."""
    if hasattr(value, "data_ptr") and callable(value.data_ptr):
        address = value.data_ptr()
    elif hasattr(value, "__cuda_array_interface__"):
        address = value.__cuda_array_interface__["data"][0]
    elif hasattr(value, "__dlpack__") and getattr(value, "ndim", 1) != 0:
        # (NumPy's integer scalars speak DLPack too, but are addresses.)
        address = _dlpack_address(value.__dlpack__())
    else:
        try:
            address = operator.index(value)
        except TypeError:
            raise InvalidArgumentError(
                f"{what} must be a device address: an int (data_ptr()), a "
                "tensor, or an object with __cuda_array_interface__ or "
                "__dlpack__") from None
    if address == 0:
        raise InvalidArgumentError(f"{what} is a null pointer")
    if not 0 < address < 2**64:
        raise InvalidArgumentError(f"{what} is not a valid address")
    return address


def _stream(stream):
    """A cudaStream_t from an int, a torch.cuda.Stream (cuda_stream) or a
    CuPy stream (ptr); 0 or None is the default stream."""
    if stream is None:
        return None
    for attribute in ("cuda_stream", "ptr"):
        if hasattr(stream, attribute):
            stream = getattr(stream, attribute)
            break
    return _int(stream, "stream", 0, 2**64 - 1) or None


def wait_event(stream, event):
    """Makes `stream` (as fetch_to_device takes it) wait, on the GPU, for
    `event`, one that fetch_to_device's on_layer gave: work queued on the
    stream afterwards sees that layer's values. Returns at once."""
    _check(_lib.kvcache_stream_wait_event(
        _stream(stream), _int(event, "event", 1, 2**64 - 1)))


def _fetch_options(transport, lease_s, profile):
    if transport not in _TRANSPORTS:
        raise InvalidArgumentError(
            "transport must be \"auto\", \"shared_memory\", \"grpc\" or "
            f"\"nccl\", not {transport!r}")
    if profile is not None and not isinstance(profile, Profile):
        raise InvalidArgumentError(
            f"profile is a {type(profile).__name__}, not a kvcache.Profile")
    options = _native.init(_native.FetchOptions, "kvcache_fetch_options_init")
    options.transport = _TRANSPORTS[transport]
    options.lease_s = float(lease_s)
    options.profile = None if profile is None else profile.handle
    return options


def _report(report, device=False):
    out = {name: getattr(report, name) for name in
           ("gpu_tier_chunks", "shared_memory_chunks", "grpc_chunks",
            "nccl_chunks", "bytes")}
    if device:
        out["first_batch_ms"] = report.first_batch_ms
    return out


def _checked_fields(fields, known, what):
    for name in fields:
        if name not in known:
            raise InvalidArgumentError(
                f"{what} has no field {name!r}; its fields: "
                f"{', '.join(known)}")
    return fields


class _Layout:
    """A layout dict (and keyword arguments) as the C struct, with the host
    arrays it points to kept alive."""

    def __init__(self, layout, kwargs):
        fields = {}
        if layout is not None:
            if not isinstance(layout, dict):
                raise InvalidArgumentError(
                    "layout must be a dict of layout fields, or pass them as "
                    "keyword arguments")
            fields.update(layout)
        for name, value in kwargs.items():
            if name in fields:
                raise InvalidArgumentError(
                    f"layout field {name} given both in layout and as a "
                    "keyword argument")
            fields[name] = value
        _checked_fields(fields, _LAYOUT_FIELDS, "a layout")
        c = _native.init(_native.DeviceLayout, "kvcache_device_layout_init")
        kind = fields.get("kind", "contiguous")
        if kind not in _KINDS:
            raise InvalidArgumentError(
                "layout kind must be \"contiguous\" or \"paged\", not "
                f"{kind!r}")
        c.kind = _KINDS[kind]
        dtype = fields.get("dtype", "float16")
        if dtype not in _DTYPES:
            raise InvalidArgumentError(
                f"dtype must be \"float16\" or \"bfloat16\", not {dtype!r}")
        c.dtype = _DTYPES[dtype]
        for name in ("layers", "kv_heads", "head_dim"):
            if name not in fields:
                raise InvalidArgumentError(f"the layout needs {name}")
        for name in ("layers", "kv_heads", "head_dim", "block_tokens",
                     "num_blocks"):
            if name in fields:
                setattr(c, name, _int(fields[name], name, 0, _U32))
        for name in ("token_stride", "kv_stride", "block_stride",
                     "layer_stride"):
            if name in fields:
                setattr(c, name, _int(fields[name], name, -2**63, 2**63 - 1))
        if "base" in fields:
            c.base = _address(fields["base"], "layout base")
        self._keep = None
        if "layer_bases" in fields:
            bases = fields["layer_bases"]
            if isinstance(bases, (list, tuple)):
                if len(bases) != c.layers:
                    raise InvalidArgumentError(
                        f"layer_bases must be a list of the {c.layers} "
                        "layers' data_ptr(), or the data_ptr() of a CUDA "
                        "int64 tensor holding them")
                self._keep = (ctypes.c_uint64 * len(bases))(*[
                    _address(b, f"layer_bases[{i}]")
                    for i, b in enumerate(bases)])
                c.layer_bases = ctypes.cast(self._keep, _native.c_uint64_p)
            else:
                c.device_layer_bases = ctypes.cast(
                    ctypes.c_void_p(_address(bases, "layer_bases")),
                    _native.c_uint64_p)
        self.c = c
        self.paged = c.kind == 1


class _Blocks:
    """blocks (one dict per chunk) as an array of the C struct, with the
    host block tables kept alive."""

    def __init__(self, blocks, n, paged):
        if (blocks is None or isinstance(blocks, (str, bytes)) or
                not hasattr(blocks, "__len__") or len(blocks) != n):
            raise InvalidArgumentError(
                f"blocks must be a list of {n} dicts, one per key: " +
                ("{'tokens', 'block_ids', 'first_slot'}" if paged else
                 "{'tokens', 'values'}"))
        self.c = (_native.DeviceChunk * max(n, 1))()
        self._keep = []
        for i, block in enumerate(blocks):
            at = f"blocks[{i}]"
            if not isinstance(block, dict):
                raise InvalidArgumentError(f"{at} must be a dict")
            _checked_fields(block, _BLOCK_FIELDS, at)
            if "tokens" not in block:
                raise InvalidArgumentError(f"{at} needs tokens")
            chunk = self.c[i]
            chunk.tokens = _int(block["tokens"], f"{at}['tokens']", 1, _U32)
            if "values" in block:
                chunk.values = _address(block["values"], f"{at}['values']")
            if "first_slot" in block:
                chunk.first_slot = _int(block["first_slot"],
                                        f"{at}['first_slot']", 0, _U32)
            if "block_ids" not in block:
                continue
            ids = block["block_ids"]
            if isinstance(ids, (list, tuple)) or (
                    hasattr(ids, "__array_interface__") and
                    not hasattr(ids, "data_ptr")):
                table = (ctypes.c_int32 * max(len(ids), 1))(*[
                    _int(b, f"{at}['block_ids'][{j}]", -2**31, 2**31 - 1)
                    for j, b in enumerate(ids)])
                self._keep.append(table)
                chunk.block_ids = ctypes.cast(table, _native.c_int32_p)
                chunk.n_block_ids = len(ids)
            else:
                chunk.device_block_ids = _address(ids, f"{at}['block_ids']")


class _Handle:
    """Owns a handle of libkvcache.so, freed by close(), `with` or the
    garbage collector."""

    _free = None  # the library's function that frees the handle
    _what = ""

    def __init__(self, handle):
        self._handle = handle

    @property
    def handle(self):
        if self._handle is None:
            raise FailedPreconditionError(f"the {self._what} is closed")
        return self._handle

    def close(self):
        """Frees the handle; no call may be running on it."""
        if getattr(self, "_handle", None) is not None:
            getattr(_lib, self._free)(self._handle)
            self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


def _key_space(model_id, chunk_tokens=256, name_space="default",
               dtype="float16", layers=0, kv_heads=0, head_dim=0, tp_rank=0,
               tp_size=1):
    space = _native.init(_native.KeySpace, "kvcache_key_space_init")
    space.name_space = _text(name_space)
    space.model_id = _text(model_id)
    space.dtype = _text(dtype)
    space.layers = _int(layers, "layers", 0, _U32)
    space.kv_heads = _int(kv_heads, "kv_heads", 0, _U32)
    space.head_dim = _int(head_dim, "head_dim", 0, _U32)
    space.tp_rank = _int(tp_rank, "tp_rank", 0, _U32)
    space.tp_size = _int(tp_size, "tp_size", 0, _U32)
    space.chunk_tokens = _int(chunk_tokens, "chunk_tokens", 0, _U32)
    return space


def chunk_keys(tokens, model_id, chunk_tokens=256, name_space="default",
               dtype="float16", layers=0, kv_heads=0, head_dim=0, tp_rank=0,
               tp_size=1):
    """Keys (32-byte bytes) of the chunks of `tokens`, chunk_tokens each (the
    last may be shorter).

    Chunk i's key chains its whole prefix, so prompts sharing a prefix share
    keys. Every other argument is part of the key space: workers share
    chunks only if all match.
    """
    ids = [_int(t, "token", -2**31, 2**31 - 1) for t in tokens]
    space = _key_space(model_id, chunk_tokens, name_space, dtype, layers,
                       kv_heads, head_dim, tp_rank, tp_size)
    array = (ctypes.c_int32 * max(len(ids), 1))(*ids)
    most = len(ids) // max(space.chunk_tokens, 1) + 1
    out = ctypes.create_string_buffer(most * 32)
    n = ctypes.c_size_t(0)
    _check(_lib.kvcache_chunk_keys(ctypes.byref(space), array, len(ids), out,
                                   most, ctypes.byref(n)))
    raw = out.raw
    return [raw[i * 32:(i + 1) * 32] for i in range(n.value)]


class Profile(_Handle):
    """A model profile: what the transform levels (profile-fine,
    profile-balanced, profile-small) encode and decode with. Made by
    `kvcodec calibrate` on the model's KV over other text, or by a worker
    that runs its model, which also measures what an error in each head
    costs the model (the levels then spend bits where it matters); kept in
    kvcache by Client.publish_profile and fetched by Client.profile."""

    _free = "kvcache_profile_free"
    _what = "profile"

    @classmethod
    def from_bytes(cls, data):
        """Parses a profile's bytes; DataLossError if they are not one."""
        data = bytes(data)
        handle = ctypes.c_void_p()
        _check(_lib.kvcache_profile_parse(data, len(data),
                                          ctypes.byref(handle)))
        return cls(handle.value)

    def to_bytes(self):
        """The bytes from_bytes takes."""
        out = ctypes.c_void_p()
        _check(_lib.kvcache_profile_bytes(self.handle, ctypes.byref(out)))
        return _native.take_buffer(out)

    @property
    def id(self):
        """The profile's id: 32 hex digits naming its content."""
        out = ctypes.create_string_buffer(33)
        _check(_lib.kvcache_profile_id(self.handle, out))
        return out.value.decode()


def stream_profile_id(stream):
    """The id of the profile a stream needs, or None if it needs none."""
    stream = bytes(stream)
    out = ctypes.create_string_buffer(33)
    try:
        _check(_lib.kvcache_stream_profile_id(stream, len(stream), out))
    except NotFoundError:
        return None
    return out.value.decode()


class Client(_Handle):
    """A connection to a kvcached node. Thread-safe; calls release the GIL.

    Connects and waits until the node answers; raises UnavailableError if it
    does not within connect_timeout_s (saying so when the TLS handshake is
    what failed). ca_file turns TLS on: the PEM CA the node's certificate
    chains to; cert_file and key_file are a client certificate for mutual
    TLS; server_name is the name the node's certificate must carry if not
    the host in address. token (or token_file, read once) is sent with every
    call as a bearer token. A credential file that cannot be used raises an
    error naming it. key_namespace names a shared namespace the tenant was
    granted.
    """

    _free = "kvcache_client_free"
    _what = "client"

    def __init__(self, address="127.0.0.1:50051", timeout_s=30.0,
                 connect_timeout_s=5.0, *, ca_file=None, cert_file=None,
                 key_file=None, server_name=None, token=None,
                 token_file=None, key_namespace=None):
        super().__init__(None)
        options = _native.init(_native.ClientOptions,
                               "kvcache_client_options_init")
        options.address = _text(address)
        options.timeout_s = float(timeout_s)
        options.connect_timeout_s = float(connect_timeout_s)
        options.ca_file = _text(ca_file)
        options.cert_file = _text(cert_file)
        options.key_file = _text(key_file)
        options.server_name = _text(server_name)
        options.token = _text(token)
        options.token_file = _text(token_file)
        options.key_namespace = _text(key_namespace)
        handle = ctypes.c_void_p()
        _check(_lib.kvcache_connect(ctypes.byref(options),
                                    ctypes.byref(handle)))
        self._handle = handle

    def lookup(self, keys):
        """The longest cached prefix of `keys`: {'prefix_chunks': n,
        'chunks': [{'size_bytes', 'tier', 'pinned'}, ...]}."""
        data, n = _keys(keys)
        infos = (_native.ChunkInfo * max(n, 1))()
        prefix = ctypes.c_size_t(0)
        _check(_lib.kvcache_lookup(self.handle, data, n, ctypes.byref(prefix),
                                   infos))
        return {
            "prefix_chunks": prefix.value,
            "chunks": [{
                "size_bytes": infos[i].size_bytes,
                "tier": _lib.kvcache_tier_name(infos[i].tier).decode(),
                "pinned": bool(infos[i].pinned)
            } for i in range(prefix.value)]
        }

    def publish_profile(self, profile, model_id, name_space="default"):
        """Stores a Profile in the node beside the model's chunks and makes
        it the model's current one."""
        space = _key_space(model_id, name_space=name_space)
        _check(_lib.kvcache_profile_publish(self.handle, ctypes.byref(space),
                                            profile.handle))

    def profile(self, model_id, name_space="default", profile_id=None):
        """The model's Profile with id `profile_id` (stream_profile_id
        gives a stream's), or its current one; fetched once per Client.
        NotFoundError if the node holds none."""
        space = _key_space(model_id, name_space=name_space)
        handle = ctypes.c_void_p()
        _check(_lib.kvcache_profile_get(
            self.handle, ctypes.byref(space),
            None if profile_id is None else _text(profile_id),
            ctypes.byref(handle)))
        return Profile(handle.value)

    def cached_prefix(self, keys):
        """How many leading chunks of `keys` the node holds, without their
        infos: the cheapest lookup, for a scheduler that needs only the
        cached prefix's length."""
        data, n = _keys(keys)
        prefix = ctypes.c_size_t(0)
        _check(_lib.kvcache_lookup(self.handle, data, n, ctypes.byref(prefix),
                                   None))
        return prefix.value

    def put(self, keys, chunks, pin_ttl_s=0.0, chained=True, replace=False):
        """Stores chunks[i] under keys[i]; pinned for pin_ttl_s seconds if
        positive (a chat session).

        chained: keys are consecutive chunks of one prompt (as from
        chunk_keys), so the node evicts the prefix from its end; pass False
        for unrelated chunks. A key the node already holds keeps its first
        copy unless replace is True.
        """
        data, n = _keys(keys)
        chunks = [c if isinstance(c, bytes) else bytes(c) for c in chunks]
        if len(chunks) != n:
            raise InvalidArgumentError(f"{n} keys but {len(chunks)} chunks")
        pointers = (ctypes.c_void_p * max(n, 1))(
            *[ctypes.cast(c, ctypes.c_void_p) for c in chunks])
        sizes = (ctypes.c_size_t * max(n, 1))(*[len(c) for c in chunks])
        options = _native.init(_native.PutOptions, "kvcache_put_options_init")
        options.pin_ttl_s = float(pin_ttl_s)
        options.chained = bool(chained)
        options.replace = bool(replace)
        _check(_lib.kvcache_put(self.handle, data, n, pointers, sizes,
                                ctypes.byref(options)))

    def get(self, keys):
        """The chunks' bytes, in order; NotFoundError if any is missing,
        DataLossError if one was found damaged."""
        data, n = _keys(keys)
        out = (ctypes.c_void_p * max(n, 1))()
        _check(_lib.kvcache_get(self.handle, data, n, out))
        return [_native.take_buffer(out[i]) for i in range(n)]

    def delete(self, keys):
        """Removes the chunks; returns how many were held."""
        data, n = _keys(keys)
        deleted = ctypes.c_uint32(0)
        _check(_lib.kvcache_delete(self.handle, data, n,
                                   ctypes.byref(deleted)))
        return deleted.value

    def pin(self, keys, ttl_s):
        """Keeps the chunks from eviction for ttl_s seconds; returns the
        expiry as Unix seconds."""
        data, n = _keys(keys)
        expiry = ctypes.c_double(0)
        _check(_lib.kvcache_pin(self.handle, data, n, float(ttl_s),
                                ctypes.byref(expiry)))
        return expiry.value

    def unpin(self, keys):
        """Clears the chunks' pins."""
        data, n = _keys(keys)
        _check(_lib.kvcache_unpin(self.handle, data, n))

    def stats(self):
        """Node counters: chunks, hits, misses, evictions, bytes_in,
        bytes_out."""
        stats = _native.Stats()
        _check(_lib.kvcache_get_stats(self.handle, ctypes.byref(stats)))
        return {name: getattr(stats, name) for name, _ in stats._fields_}

    def fetch(self, keys, out, transport="auto", lease_s=30.0,
              profile=None, decode_threads=1):
        """Restores the chunks of `keys` into NumPy arrays, decoded on the
        CPU.

        keys: a prefix the node holds (lookup()'s prefix_chunks of them).
        out: one array per key, which you own: C-contiguous, writeable,
          shaped as decode() returns the chunk, [layers, 2, tokens,
          kv_heads * head_dim]; float16 for float16 chunks, or uint16 (the
          bits of either dtype; NumPy has no bfloat16). A prompt's last
          chunk may have fewer tokens.
        transport: 'auto' reads the node's memory in place when it runs on
          this host, and streams over gRPC otherwise (or for chunks it
          cannot lend); 'shared_memory' insists on memory, raising
          FailedPreconditionError for any chunk it cannot lend (a missing
          one too); 'grpc' always streams; 'nccl' is for fetch_to_device.
        lease_s: how long the node keeps the chunks in place for a
          shared-memory read; a fetch that outlasts it fails rather than
          read reused memory.
        profile: the model's Profile (Client.profile), which chunks at the
          transform levels need; FailedPreconditionError for such a chunk
          without it.
        decode_threads: threads (1 to 256) that decode the chunks read in
          place from the node's memory while the fetch goes on; 1 decodes
          on the calling thread only.

        Returns {'gpu_tier_chunks', 'shared_memory_chunks', 'grpc_chunks',
        'nccl_chunks', 'bytes'}: which transport carried how many chunks,
        and their compressed bytes.

        Raises InvalidArgumentError for arrays of the wrong shape, dtype or
        layout: before fetching where the arrays show it, else when a
        chunk's header disagrees, before it is decoded into its array;
        NotFoundError if a chunk is missing (evicted since lookup());
        DataLossError for a corrupt one. On any error the fetch failed as a
        whole, though arrays of earlier chunks may hold their values.
        Threads may fetch through one Client at once.
        """
        data, n = _keys(keys)
        options = _fetch_options(transport, lease_s, profile)
        options.decode_threads = _int(decode_threads, "decode_threads", 1,
                                      256)
        if isinstance(out, (str, bytes)) or len(out) != n:
            raise InvalidArgumentError(
                f"{n} keys but {len(out)} arrays in out; give one per key")
        np = _numpy()
        chunks = (_native.HostChunk * max(n, 1))()
        for i, array in enumerate(out):
            if not isinstance(array, np.ndarray):
                raise InvalidArgumentError(
                    f"out[{i}] is a {type(array).__name__}, not a numpy "
                    "array")
            dtype = array.dtype
            if (dtype.itemsize != 2 or dtype.kind not in "fu" or
                    not dtype.isnative or array.ndim != 4 or
                    array.shape[1] != 2):
                raise InvalidArgumentError(
                    f"out[{i}] is a {dtype} array shaped {array.shape}; "
                    "fetch decodes into float16 or uint16 arrays shaped "
                    "[layers, 2, tokens, kv_heads * head_dim]")
            if not array.flags.c_contiguous or not array.flags.writeable:
                raise InvalidArgumentError(
                    f"out[{i}] must be C-contiguous and writeable "
                    "(np.empty(...) or np.ascontiguousarray)")
            chunks[i] = _native.HostChunk(
                array.ctypes.data, _int(array.shape[0], "layers", 0, _U32),
                _int(array.shape[2], "tokens", 0, _U32),
                _int(array.shape[3], "channels", 0, _U32),
                dtype.kind == "f")
        report = _native.FetchReport()
        _check(_lib.kvcache_fetch(self.handle, data, n, chunks,
                                  ctypes.byref(options),
                                  ctypes.byref(report)))
        return _report(report)

    def fetch_to_device(self, keys, layout=None, blocks=None, stream=0,
                        transport="auto", lease_s=30.0, profile=None,
                        on_layer=None, **layout_fields):
        """Restores the chunks of `keys` straight into the engine's GPU KV
        cache.

        Each chunk's compressed bytes are copied to the GPU (from the node's
        memory in place on this host, else as they arrive over gRPC) and
        decoded there, batches of chunks decoding on `stream` while the next
        ones copy; chunks in the node's GPU tier (same host, CUDA IPC)
        decode where they lie, and a node on another host whose GPU tier
        opens NCCL links sends them GPU to GPU (transport 'auto' or
        'nccl'). Returns when the decode is done: {'gpu_tier_chunks',
        'shared_memory_chunks', 'grpc_chunks', 'nccl_chunks', 'bytes',
        'first_batch_ms'}, the last the GPU time from the first copy to the
        first batch decoded.

        layout: where the cache lives, as a dict or as keyword arguments:
          layers, kv_heads, head_dim: this worker's (kv_heads of its rank)
          dtype: 'float16' (default) or 'bfloat16'
          kind: 'contiguous' (default): each chunk into its own buffer
              [layers, 2, tokens, kv_heads * head_dim];
            or 'paged', with block_tokens (tokens per block), num_blocks,
            and layer_bases: a cache per layer (vLLM, FlashInfer): a list
              of the layers' addresses, or the address of a CUDA int64
              tensor of them;
            or base: one allocation, layers layer_stride elements apart.
            Element (layer, kv, token slot s of block b, channel c) is at
            layer_base[b * block_stride + kv * kv_stride +
            s * token_stride + c]; the strides count 16-bit elements and
            default to a per-layer cache [num_blocks, 2, block_tokens,
            kv_heads, head_dim] (K and V in separate caches: kv_stride is
            V's base minus K's, in elements).
        blocks: one dict per key, where its chunk goes:
          tokens: the chunk's token count (the last may be shorter);
          values (contiguous): the chunk's buffer;
          block_ids (paged): the request's blocks, a list of ints or a CUDA
            int32 tensor; token t of the chunk goes to slot first_slot + t
            of them (first_slot defaults to 0).
        An address is an int (a tensor's data_ptr()), a tensor, or anything
        with __cuda_array_interface__ or __dlpack__.
        stream: the cudaStream_t to decode on: an int, a torch.cuda.Stream
          or a CuPy stream; 0 is the default stream.
        transport, lease_s, profile: as for fetch(); 'nccl' insists on an
          NCCL link from the node's GPU (FailedPreconditionError if none
          opens).
        on_layer: restores layer by layer when given: the chunks' bytes go
          to the GPU a layer at a time, and on_layer(layer, event) is called
          for each layer in order, on this thread, as soon as the layer's
          decode is queued on `stream`. `event` (a cudaEvent_t, as an int,
          valid during this call) is recorded after it:
          kvcache.wait_event(compute_stream, event) makes an engine's stream
          wait for the layer on the GPU, so it computes layer l while later
          layers arrive. The prefix's compressed bytes are staged on the
          GPU at once; a corrupt chunk raises DataLossError after its
          earlier layers were written. An exception on_layer raises is
          raised from here, after the fetch.

        All addresses must be on one GPU; the call runs on that GPU.
        Raises FailedPreconditionError on a host without a GPU (use
        fetch()); InvalidArgumentError for a malformed layout or blocks, or
        an address that is not GPU memory (before anything is fetched);
        NotFoundError if a chunk is missing; DataLossError if the GPU
        rejects a chunk (corrupt, or of another shape or dtype than the
        layout), whose blocks are then left untouched.
        """
        data, n = _keys(keys)
        options = _fetch_options(transport, lease_s, profile)
        parsed = _Layout(layout, layout_fields)
        places = _Blocks(blocks, n, parsed.paged)
        report = _native.FetchReport()
        raised = []
        if on_layer is not None:
            if not callable(on_layer):
                raise InvalidArgumentError(
                    f"on_layer is a {type(on_layer).__name__}, not callable")

            def signal(_user, layer, event):
                if raised:
                    return
                try:
                    on_layer(layer, event)
                except BaseException as e:  # raised after the fetch
                    raised.append(e)

            # Kept referenced through the call.
            options.on_layer = _native.LayerCallback(signal)
        _check(_lib.kvcache_fetch_to_device(
            self.handle, data, n, ctypes.byref(parsed.c), places.c,
            _stream(stream), ctypes.byref(options), ctypes.byref(report)))
        if raised:
            raise raised[0]
        return _report(report, device=True)

    def storer(self, layout=None, level="near-lossless", chunk_tokens=256,
               batch_chunks=8, slots=2, **layout_fields):
        """A Storer: stores chunks straight from the engine's GPU KV cache.

        layout: where the cache lives, as for fetch_to_device() (a dict, or
          keyword arguments); a list of layer_bases is copied to the GPU
          once, here, so the caches must stay where they are for the
          Storer's life.
        level: the codec level the chunks are encoded at.
        chunk_tokens: the longest chunk store() takes (sizes the GPU slots).
        batch_chunks, slots: chunks encoded per launch, and launches in
          flight.

        The Storer holds device memory on the layout's GPU for its slots
        (device_bytes): about 2 GiB for 2 slots of 8 Llama-8B chunks of 256
        tokens. Raises FailedPreconditionError on a host without a GPU.
        """
        parsed = _Layout(layout, layout_fields)
        options = _native.init(_native.StorerOptions,
                               "kvcache_storer_options_init")
        options.level = _text(level)
        options.chunk_tokens = _int(chunk_tokens, "chunk_tokens", 0, _U32)
        options.batch_chunks = _int(batch_chunks, "batch_chunks", 0, _U32)
        options.slots = _int(slots, "slots", 0, _U32)
        handle = ctypes.c_void_p()
        _check(_lib.kvcache_storer_create(self.handle, ctypes.byref(parsed.c),
                                          ctypes.byref(options),
                                          ctypes.byref(handle)))
        return Storer(self, handle, parsed.paged)


class Storer(_Handle):
    """Stores chunks from GPU blocks; made by Client.storer(). close()
    waits for what is queued, then frees it."""

    _free = "kvcache_storer_free"
    _what = "storer"

    def __init__(self, client, handle, paged):
        super().__init__(handle)
        self._client = client  # the connection outlives the storer
        self._paged = paged

    def store(self, keys, blocks, stream=0, parent=None, pin_ttl_s=0.0):
        """Queues storing the chunks of `keys` from the blocks; returns a
        ticket.

        The chunks are encoded on `stream` behind the work already queued
        there, so call it after the prefill that wrote them, on the same
        stream; work queued on the stream afterwards may overwrite the
        blocks. It returns once the encode is queued (it waits only when
        every slot is busy); the bitstreams are copied down and put into
        the node in the background. Chunk i names keys[i - 1] as its
        parent, and the first names `parent` (the chunk before them in
        their prompt, or None for a prompt's first chunk), so the node
        evicts a prompt from its end. pin_ttl_s > 0 stores them pinned.

        blocks: one dict per key, as for fetch_to_device(), read instead of
        written. Raises InvalidArgumentError for malformed blocks, a chunk
        longer than chunk_tokens, or addresses on another GPU than the
        layout's.
        """
        data, n = _keys(keys)
        places = _Blocks(blocks, n, self._paged)
        if parent is not None:
            parent, _ = _keys([parent])
        ticket = ctypes.c_uint64(0)
        _check(_lib.kvcache_storer_store(self.handle, data, n, places.c,
                                         _stream(stream), parent,
                                         float(pin_ttl_s),
                                         ctypes.byref(ticket)))
        return ticket.value

    def wait(self, ticket):
        """Waits until a ticket's chunks are stored in the node.

        Returns {'chunks', 'raw_bytes', 'stored_bytes'}. A chunk the GPU
        could not read (a block id outside the cache) raises
        InvalidArgumentError naming it, and none of the ticket's later
        chunks is stored, so a stored prompt has no holes; a node's error is
        raised as it came. A ticket can be waited for once.
        """
        report = _native.StoreReport()
        _check(_lib.kvcache_storer_wait(self.handle, int(ticket),
                                        ctypes.byref(report)))
        return {name: getattr(report, name) for name, _ in report._fields_}

    @property
    def device_bytes(self):
        """Device memory the Storer's slots hold."""
        return _lib.kvcache_storer_device_bytes(self.handle)


def encode(values, kv_heads, head_dim, level="near-lossless",
           dtype="float16", profile=None, first_position=0):
    """Compresses one chunk: a C-contiguous 16-bit array shaped [layers, 2,
    tokens, kv_heads * head_dim] (NumPy float16, or uint16 holding bfloat16
    bits with dtype='bfloat16'). Levels: lossless, near-lossless, high,
    default, compact, tiny, and the transform levels profile-fine,
    profile-balanced and profile-small, which need the model's Profile and
    the position of the chunk's first token in its sequence."""
    np = _numpy()
    if (not isinstance(values, np.ndarray) or values.itemsize != 2 or
            values.ndim != 4 or values.shape[1] != 2 or
            not values.flags.c_contiguous):
        raise InvalidArgumentError(
            "values must be a C-contiguous 16-bit array shaped [layers, 2, "
            "tokens, kv_heads * head_dim]")
    kv_heads = _int(kv_heads, "kv_heads", 0, _U32)
    head_dim = _int(head_dim, "head_dim", 0, _U32)
    if head_dim == 0 or values.shape[3] != kv_heads * head_dim:
        raise InvalidArgumentError(
            f"last dimension is {values.shape[3]}, not kv_heads {kv_heads} x "
            f"head_dim {head_dim}")
    if dtype not in _DTYPES:
        raise InvalidArgumentError(
            f"dtype must be \"float16\" or \"bfloat16\", not {dtype!r}")
    shape = _native.ChunkShape(_int(values.shape[0], "layers", 0, _U32),
                               _int(values.shape[2], "tokens", 0, _U32),
                               kv_heads, head_dim, _DTYPES[dtype])
    stream = ctypes.c_void_p()
    _check(_lib.kvcache_encode_with_profile(
        ctypes.byref(shape), values.ctypes.data, values.size, _text(level),
        None if profile is None else profile.handle,
        _int(first_position, "first_position", 0, _U32),
        ctypes.byref(stream)))
    return _native.take_buffer(stream)


def _shape(stream):
    shape = _native.ChunkShape()
    _check(_lib.kvcache_peek_shape(stream, len(stream), ctypes.byref(shape)))
    return shape


def decode(stream, profile=None):
    """Decodes a stream from encode(): a float16 array (uint16 for
    bfloat16) shaped [layers, 2, tokens, channels]. Raises DataLossError
    for a corrupt or truncated stream, FailedPreconditionError for a
    transform stream without the Profile it names."""
    np = _numpy()
    stream = bytes(stream)
    shape = _shape(stream)
    out = np.empty((shape.layers, 2, shape.tokens,
                    shape.kv_heads * shape.head_dim),
                   np.float16 if shape.dtype == 0 else np.uint16)
    _check(_lib.kvcache_decode_with_profile(
        stream, len(stream), out.ctypes.data, out.size,
        None if profile is None else profile.handle))
    return out


def peek_shape(stream):
    """The shape a stream records, after checking its header."""
    shape = _shape(bytes(stream))
    return {
        "layers": shape.layers,
        "tokens": shape.tokens,
        "kv_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "dtype": "float16" if shape.dtype == 0 else "bfloat16"
    }
