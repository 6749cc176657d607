"""libkvcache.so through ctypes: its structs, its functions, and errors.

The library is found beside this file (_lib/, as the wheel carries it), or
at $KVCACHE_LIBRARY. ctypes releases the GIL for every call into it.
"""

import ctypes
import os

ABI_VERSION = 2
KEY_BYTES = 32

c_int32_p = ctypes.POINTER(ctypes.c_int32)
c_uint8_p = ctypes.POINTER(ctypes.c_uint8)
c_uint64_p = ctypes.POINTER(ctypes.c_uint64)


class Error(RuntimeError):
    """Base class of kvcache errors."""


class InvalidArgumentError(Error, ValueError):
    """A malformed request: bad key, shape or option."""


class NotFoundError(Error, KeyError):
    """A chunk the node does not hold (or a credential file missing)."""

    def __str__(self):  # KeyError would quote the message
        return Error.__str__(self)


class ResourceExhaustedError(Error):
    """No room even after eviction, or a limit of the node or tenant."""


class FailedPreconditionError(Error):
    """The request cannot be served as asked here and now: the node is
    draining, transport='shared_memory' where the node lends no memory, or a
    device call on a host without a GPU."""


class DataLossError(Error):
    """Damaged bytes: a checksum mismatch or a corrupt codec stream."""


class UnavailableError(Error, ConnectionError):
    """The node cannot be reached or timed out."""


class PermissionDeniedError(Error, PermissionError):
    """The caller's tenant or role may not make this call."""


class UnauthenticatedError(Error, PermissionError):
    """The node did not accept the caller's token or certificate."""


_ERRORS = {
    3: InvalidArgumentError,
    4: UnavailableError,  # DEADLINE_EXCEEDED
    5: NotFoundError,
    7: PermissionDeniedError,
    8: ResourceExhaustedError,
    9: FailedPreconditionError,
    14: UnavailableError,
    15: DataLossError,
    16: UnauthenticatedError,
}


class KeySpace(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t),
                ("name_space", ctypes.c_char_p),
                ("model_id", ctypes.c_char_p),
                ("dtype", ctypes.c_char_p),
                ("layers", ctypes.c_uint32),
                ("kv_heads", ctypes.c_uint32),
                ("head_dim", ctypes.c_uint32),
                ("tp_rank", ctypes.c_uint32),
                ("tp_size", ctypes.c_uint32),
                ("chunk_tokens", ctypes.c_uint32)]


class ClientOptions(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t),
                ("address", ctypes.c_char_p),
                ("timeout_s", ctypes.c_double),
                ("connect_timeout_s", ctypes.c_double),
                ("ca_file", ctypes.c_char_p),
                ("cert_file", ctypes.c_char_p),
                ("key_file", ctypes.c_char_p),
                ("server_name", ctypes.c_char_p),
                ("token", ctypes.c_char_p),
                ("token_file", ctypes.c_char_p),
                ("key_namespace", ctypes.c_char_p)]


class ChunkInfo(ctypes.Structure):
    _fields_ = [("size_bytes", ctypes.c_uint64),
                ("tier", ctypes.c_int32),
                ("pinned", ctypes.c_int32)]


class PutOptions(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t),
                ("pin_ttl_s", ctypes.c_double),
                ("chained", ctypes.c_int),
                ("replace", ctypes.c_int)]


class Stats(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("chunks", "hits", "misses", "evictions", "bytes_in",
                 "bytes_out")]


# on_layer(user, layer, cudaEvent_t) of kvcache_fetch_options.
LayerCallback = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint32,
                                 ctypes.c_void_p)


class FetchOptions(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t),
                ("transport", ctypes.c_int32),
                ("lease_s", ctypes.c_double),
                ("profile", ctypes.c_void_p),
                ("decode_threads", ctypes.c_int32),
                ("on_layer", LayerCallback),
                ("on_layer_user", ctypes.c_void_p)]


class FetchReport(ctypes.Structure):
    _fields_ = [("gpu_tier_chunks", ctypes.c_uint32),
                ("shared_memory_chunks", ctypes.c_uint32),
                ("grpc_chunks", ctypes.c_uint32),
                ("nccl_chunks", ctypes.c_uint32),
                ("bytes", ctypes.c_uint64),
                ("first_batch_ms", ctypes.c_float)]


class HostChunk(ctypes.Structure):
    _fields_ = [("values", ctypes.c_void_p),
                ("layers", ctypes.c_uint32),
                ("tokens", ctypes.c_uint32),
                ("channels", ctypes.c_uint32),
                ("float16_only", ctypes.c_int32)]


class DeviceLayout(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t),
                ("kind", ctypes.c_int32),
                ("dtype", ctypes.c_int32),
                ("layers", ctypes.c_uint32),
                ("kv_heads", ctypes.c_uint32),
                ("head_dim", ctypes.c_uint32),
                ("block_tokens", ctypes.c_uint32),
                ("num_blocks", ctypes.c_uint32),
                ("layer_bases", c_uint64_p),
                ("device_layer_bases", c_uint64_p),
                ("base", ctypes.c_uint64),
                ("token_stride", ctypes.c_int64),
                ("kv_stride", ctypes.c_int64),
                ("block_stride", ctypes.c_int64),
                ("layer_stride", ctypes.c_int64)]


class DeviceChunk(ctypes.Structure):
    _fields_ = [("tokens", ctypes.c_uint32),
                ("values", ctypes.c_uint64),
                ("block_ids", c_int32_p),
                ("n_block_ids", ctypes.c_uint32),
                ("device_block_ids", ctypes.c_uint64),
                ("first_slot", ctypes.c_uint32)]


class StorerOptions(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t),
                ("level", ctypes.c_char_p),
                ("chunk_tokens", ctypes.c_uint32),
                ("batch_chunks", ctypes.c_uint32),
                ("slots", ctypes.c_uint32)]


class StoreReport(ctypes.Structure):
    _fields_ = [("chunks", ctypes.c_uint64),
                ("raw_bytes", ctypes.c_uint64),
                ("stored_bytes", ctypes.c_uint64)]


class ChunkShape(ctypes.Structure):
    _fields_ = [("layers", ctypes.c_uint32),
                ("tokens", ctypes.c_uint32),
                ("kv_heads", ctypes.c_uint32),
                ("head_dim", ctypes.c_uint32),
                ("dtype", ctypes.c_int32)]


P = ctypes.POINTER
_void_p = ctypes.c_void_p
_size = ctypes.c_size_t

# name: (restype, argtypes); functions that can fail return a status.
_FUNCTIONS = {
    "kvcache_abi_version": (ctypes.c_uint32, []),
    "kvcache_last_error": (ctypes.c_char_p, []),
    "kvcache_status_name": (ctypes.c_char_p, [ctypes.c_int]),
    "kvcache_tier_name": (ctypes.c_char_p, [ctypes.c_int]),
    "kvcache_buffer_data": (_void_p, [_void_p]),
    "kvcache_buffer_size": (_size, [_void_p]),
    "kvcache_buffer_free": (None, [_void_p]),
    "kvcache_key_space_init": (None, [P(KeySpace)]),
    "kvcache_chunk_keys": (ctypes.c_int, [P(KeySpace), c_int32_p, _size,
                                          _void_p, _size, P(_size)]),
    "kvcache_client_options_init": (None, [P(ClientOptions)]),
    "kvcache_connect": (ctypes.c_int, [P(ClientOptions), P(_void_p)]),
    "kvcache_client_free": (None, [_void_p]),
    "kvcache_lookup": (ctypes.c_int, [_void_p, _void_p, _size, P(_size),
                                      P(ChunkInfo)]),
    "kvcache_put_options_init": (None, [P(PutOptions)]),
    "kvcache_put": (ctypes.c_int, [_void_p, _void_p, _size, P(_void_p),
                                   P(_size), P(PutOptions)]),
    "kvcache_get": (ctypes.c_int, [_void_p, _void_p, _size, P(_void_p)]),
    "kvcache_delete": (ctypes.c_int, [_void_p, _void_p, _size,
                                      P(ctypes.c_uint32)]),
    "kvcache_pin": (ctypes.c_int, [_void_p, _void_p, _size, ctypes.c_double,
                                   P(ctypes.c_double)]),
    "kvcache_unpin": (ctypes.c_int, [_void_p, _void_p, _size]),
    "kvcache_get_stats": (ctypes.c_int, [_void_p, P(Stats)]),
    "kvcache_fetch_options_init": (None, [P(FetchOptions)]),
    "kvcache_fetch": (ctypes.c_int, [_void_p, _void_p, _size, P(HostChunk),
                                     P(FetchOptions), P(FetchReport)]),
    "kvcache_device_layout_init": (None, [P(DeviceLayout)]),
    "kvcache_fetch_to_device": (ctypes.c_int, [
        _void_p, _void_p, _size, P(DeviceLayout), P(DeviceChunk), _void_p,
        P(FetchOptions), P(FetchReport)]),
    "kvcache_stream_wait_event": (ctypes.c_int, [_void_p, _void_p]),
    "kvcache_storer_options_init": (None, [P(StorerOptions)]),
    "kvcache_storer_create": (ctypes.c_int, [_void_p, P(DeviceLayout),
                                             P(StorerOptions), P(_void_p)]),
    "kvcache_storer_store": (ctypes.c_int, [
        _void_p, _void_p, _size, P(DeviceChunk), _void_p, _void_p,
        ctypes.c_double, P(ctypes.c_uint64)]),
    "kvcache_storer_wait": (ctypes.c_int, [_void_p, ctypes.c_uint64,
                                           P(StoreReport)]),
    "kvcache_storer_device_bytes": (ctypes.c_uint64, [_void_p]),
    "kvcache_storer_free": (None, [_void_p]),
    "kvcache_encode": (ctypes.c_int, [P(ChunkShape), _void_p, _size,
                                      ctypes.c_char_p, P(_void_p)]),
    "kvcache_peek_shape": (ctypes.c_int, [_void_p, _size, P(ChunkShape)]),
    "kvcache_decode": (ctypes.c_int, [_void_p, _size, _void_p, _size]),
    "kvcache_profile_parse": (ctypes.c_int, [_void_p, _size, P(_void_p)]),
    "kvcache_profile_bytes": (ctypes.c_int, [_void_p, P(_void_p)]),
    "kvcache_profile_id": (ctypes.c_int, [_void_p, ctypes.c_char_p]),
    "kvcache_profile_free": (None, [_void_p]),
    "kvcache_profile_publish": (ctypes.c_int, [_void_p, P(KeySpace),
                                               _void_p]),
    "kvcache_profile_get": (ctypes.c_int, [_void_p, P(KeySpace),
                                           ctypes.c_char_p, P(_void_p)]),
    "kvcache_stream_profile_id": (ctypes.c_int, [_void_p, _size,
                                                 ctypes.c_char_p]),
    "kvcache_encode_with_profile": (ctypes.c_int, [
        P(ChunkShape), _void_p, _size, ctypes.c_char_p, _void_p,
        ctypes.c_uint32, P(_void_p)]),
    "kvcache_decode_with_profile": (ctypes.c_int, [_void_p, _size, _void_p,
                                                   _size, _void_p]),
}


def _library_path():
    path = os.environ.get("KVCACHE_LIBRARY")
    if path:
        return path
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "_lib",
                        "libkvcache.so")


def _load():
    path = _library_path()
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        raise ImportError(
            f"kvcache cannot load its library {path}: {e}. Install the "
            "kvcache wheel, or set KVCACHE_LIBRARY to a libkvcache.so") from e
    for name, (restype, argtypes) in _FUNCTIONS.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes
    version = lib.kvcache_abi_version()
    if version != ABI_VERSION:
        raise ImportError(
            f"{path} implements kvcache ABI {version}; this package speaks "
            f"{ABI_VERSION}")
    return lib


lib = _load()


def check(status):
    """Raises the typed error for a failed call's status."""
    if status != 0:
        message = lib.kvcache_last_error().decode("utf-8", "replace")
        raise _ERRORS.get(status, Error)(message)


def init(struct_type, init_function):
    """A struct initialised with its _init function (defaults, size)."""
    value = struct_type()
    getattr(lib, init_function)(ctypes.byref(value))
    return value


def take_buffer(handle):
    """The bytes of a kvcache_buffer, which is freed."""
    try:
        return ctypes.string_at(lib.kvcache_buffer_data(handle),
                                lib.kvcache_buffer_size(handle))
    finally:
        lib.kvcache_buffer_free(handle)
