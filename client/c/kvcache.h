/* kvcache's C ABI: the client library and the codec for any language that
 * can call C (Python through ctypes, Rust, Go, an engine's own C++ built with
 * another compiler).
 *
 * libkvcache.so exports only the functions below. Every handle is opaque;
 * nothing of C++ crosses the boundary.
 *
 * Errors: every function that can fail returns a kvcache_status, one of the
 * canonical codes below (gRPC's numbering), KVCACHE_OK (0) on success. After
 * a failure, kvcache_last_error() gives the message, which stays valid on
 * the calling thread until its next call into the library.
 *
 * Threads: a kvcache_client is thread-safe and meant to be shared; calls
 * block the calling thread only. A kvcache_storer is thread-safe too.
 *
 * Versioning: KVCACHE_ABI_VERSION grows whenever the ABI changes;
 * kvcache_abi_version() is what the loaded library implements. Option
 * structs begin with struct_size (set by their _init function) so that a
 * library can accept structs from callers built against an older header.
 *
 * Keys are 32 bytes (KVCACHE_KEY_BYTES); n keys are passed as n * 32
 * contiguous bytes. */
#ifndef KVCACHE_CLIENT_C_KVCACHE_H_
#define KVCACHE_CLIENT_C_KVCACHE_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KVCACHE_ABI_VERSION 2
#define KVCACHE_KEY_BYTES 32

#define KVCACHE_EXPORT __attribute__((visibility("default")))

typedef enum {
  KVCACHE_OK = 0,
  KVCACHE_CANCELLED = 1,
  KVCACHE_UNKNOWN = 2,
  KVCACHE_INVALID_ARGUMENT = 3,
  KVCACHE_DEADLINE_EXCEEDED = 4,
  KVCACHE_NOT_FOUND = 5,
  KVCACHE_ALREADY_EXISTS = 6,
  KVCACHE_PERMISSION_DENIED = 7,
  KVCACHE_RESOURCE_EXHAUSTED = 8,
  KVCACHE_FAILED_PRECONDITION = 9,
  KVCACHE_ABORTED = 10,
  KVCACHE_OUT_OF_RANGE = 11,
  KVCACHE_UNIMPLEMENTED = 12,
  KVCACHE_INTERNAL = 13,
  KVCACHE_UNAVAILABLE = 14,
  KVCACHE_DATA_LOSS = 15,
  KVCACHE_UNAUTHENTICATED = 16
} kvcache_status;

/* The ABI version of the loaded library (KVCACHE_ABI_VERSION it was built
 * with). */
KVCACHE_EXPORT uint32_t kvcache_abi_version(void);
/* The message of the calling thread's last failed call ("" if none). */
KVCACHE_EXPORT const char* kvcache_last_error(void);
/* "OK", "NOT_FOUND", ...; "UNKNOWN" for a code not listed. */
KVCACHE_EXPORT const char* kvcache_status_name(int status);

/* ---- Bytes the library hands out (a chunk, an encoded stream) ---- */

typedef struct kvcache_buffer kvcache_buffer;
KVCACHE_EXPORT const uint8_t* kvcache_buffer_data(const kvcache_buffer* b);
KVCACHE_EXPORT size_t kvcache_buffer_size(const kvcache_buffer* b);
KVCACHE_EXPORT void kvcache_buffer_free(kvcache_buffer* b); /* NULL is fine */

/* ---- Chunk keys ---- */

/* Everything a key depends on besides the tokens: workers share chunks only
 * if all of it matches. Strings are NUL-terminated; NULL means "". */
typedef struct {
  size_t struct_size;
  const char* name_space; /* default "default" */
  const char* model_id;   /* required */
  const char* dtype;      /* default "float16" */
  uint32_t layers, kv_heads, head_dim;
  uint32_t tp_rank, tp_size; /* default 0 of 1 */
  uint32_t chunk_tokens;     /* default 256 */
} kvcache_key_space;
KVCACHE_EXPORT void kvcache_key_space_init(kvcache_key_space* space);

/* Keys of the chunks of tokens[0, n_tokens), chunk_tokens each (the last may
 * be shorter), into keys_out (room for max_keys keys); *n_keys is how many
 * there are. Chunk i's key chains its whole prefix. INVALID_ARGUMENT if
 * there are more than max_keys (with *n_keys set to the count needed). */
KVCACHE_EXPORT int kvcache_chunk_keys(const kvcache_key_space* space,
                                      const int32_t* tokens, size_t n_tokens,
                                      uint8_t* keys_out, size_t max_keys,
                                      size_t* n_keys);

/* ---- Connecting ---- */

typedef struct kvcache_client kvcache_client;

typedef struct {
  size_t struct_size;
  const char* address;      /* host:port; default "127.0.0.1:50051" */
  double timeout_s;         /* deadline of each call; default 30 */
  double connect_timeout_s; /* default 5 */
  /* TLS: ca_file turns it on; cert_file and key_file for mutual TLS;
   * server_name if the certificate does not carry the host in address. */
  const char* ca_file;
  const char* cert_file;
  const char* key_file;
  const char* server_name;
  /* A bearer token sent with every call, or a file holding it. */
  const char* token;
  const char* token_file;
  /* A shared namespace the tenant was granted; NULL: its own. */
  const char* key_namespace;
} kvcache_client_options;
KVCACHE_EXPORT void kvcache_client_options_init(
    kvcache_client_options* options);

/* Connects and waits until the node answers: UNAVAILABLE if it does not
 * within connect_timeout_s (saying so when the TLS handshake failed); a
 * credential file that cannot be used is an error naming it. */
KVCACHE_EXPORT int kvcache_connect(const kvcache_client_options* options,
                                   kvcache_client** client);
/* Closes the connection; NULL is fine. No call may be running on it. */
KVCACHE_EXPORT void kvcache_client_free(kvcache_client* client);

/* ---- The chunk store ---- */

typedef enum {
  KVCACHE_TIER_UNSPECIFIED = 0,
  KVCACHE_TIER_GPU = 1,
  KVCACHE_TIER_CPU = 2,
  KVCACHE_TIER_NVME = 3
} kvcache_tier;
/* "TIER_GPU", "TIER_CPU", "TIER_NVME"; "TIER_UNSPECIFIED" for others. */
KVCACHE_EXPORT const char* kvcache_tier_name(int tier);

typedef struct {
  uint64_t size_bytes;
  int32_t tier; /* kvcache_tier */
  int32_t pinned;
} kvcache_chunk_info;

/* The longest prefix of keys the node holds: *prefix_chunks, and (if infos
 * is not NULL, room for n) each prefix chunk's info. Without infos the node
 * only counts, which is the cheapest lookup (an engine's scheduler). */
KVCACHE_EXPORT int kvcache_lookup(kvcache_client* client, const uint8_t* keys,
                                  size_t n, size_t* prefix_chunks,
                                  kvcache_chunk_info* infos);

typedef struct {
  size_t struct_size;
  double pin_ttl_s; /* > 0: pinned that long (a chat session) */
  /* Keys are consecutive chunks of one prompt, so the node evicts the
   * prompt from its end. Default 1. */
  int chained;
  /* Overwrite a key the node holds (default 0: it keeps its first copy). */
  int replace;
} kvcache_put_options;
KVCACHE_EXPORT void kvcache_put_options_init(kvcache_put_options* options);

/* Stores chunks[i] (sizes[i] bytes) under key i, in one stream. options may
 * be NULL. Chunks before a failing one may have been stored. */
KVCACHE_EXPORT int kvcache_put(kvcache_client* client, const uint8_t* keys,
                               size_t n, const void* const* chunks,
                               const size_t* sizes,
                               const kvcache_put_options* options);
/* The chunks' bytes: out[i] for key i (free each with kvcache_buffer_free).
 * NOT_FOUND if any is missing, DATA_LOSS if one was damaged; on an error
 * out is left all NULL. */
KVCACHE_EXPORT int kvcache_get(kvcache_client* client, const uint8_t* keys,
                               size_t n, kvcache_buffer** out);
/* Removes the chunks; *deleted is how many were held (may be NULL). */
KVCACHE_EXPORT int kvcache_delete(kvcache_client* client, const uint8_t* keys,
                                  size_t n, uint32_t* deleted);
/* Keeps the chunks from eviction for ttl_s; *expiry_unix_s (may be NULL) is
 * when that ends. */
KVCACHE_EXPORT int kvcache_pin(kvcache_client* client, const uint8_t* keys,
                               size_t n, double ttl_s, double* expiry_unix_s);
KVCACHE_EXPORT int kvcache_unpin(kvcache_client* client, const uint8_t* keys,
                                 size_t n);

typedef struct {
  uint64_t chunks, hits, misses, evictions, bytes_in, bytes_out;
} kvcache_stats;
KVCACHE_EXPORT int kvcache_get_stats(kvcache_client* client,
                                     kvcache_stats* stats);

/* ---- Restoring a prefix ---- */

typedef enum {
  /* The node's memory in place on this host, gRPC otherwise. */
  KVCACHE_TRANSPORT_AUTO = 0,
  /* The node's memory only: FAILED_PRECONDITION for a chunk it can't lend. */
  KVCACHE_TRANSPORT_SHARED_MEMORY = 1,
  KVCACHE_TRANSPORT_GRPC = 2,
  /* GPU to GPU from the node's GPU tier (fetch_to_device only). */
  KVCACHE_TRANSPORT_NCCL = 3
} kvcache_transport;

typedef struct {
  size_t struct_size;
  int32_t transport; /* kvcache_transport; default AUTO */
  /* How long the node keeps chunks in place for a shared-memory read;
   * default 30. */
  double lease_s;
  /* The model profile that chunks at the transform levels name
   * (kvcache_profile_get), kept by the caller through the call. NULL: none;
   * such a chunk then fails the fetch with FAILED_PRECONDITION. */
  const struct kvcache_profile* profile;
  /* kvcache_fetch: threads that decode chunks read in place from the node's
   * memory while the fetch goes on; default 1 (the calling thread only),
   * at most 256. */
  int32_t decode_threads;
  /* kvcache_fetch_to_device: restores layer by layer when set. The chunks'
   * bytes go to the GPU layer by layer, and on_layer(on_layer_user, layer,
   * event) is called for each layer in order, on the calling thread, as
   * soon as that layer's decode is queued on the call's stream. `event`, a
   * cudaEvent_t valid until the call returns, is recorded after it: a
   * stream that waits on it (cudaStreamWaitEvent) reads the layer's values,
   * so an engine computes layer l while later layers arrive. The prefix's
   * compressed bytes are staged on the GPU at once, and a corrupt chunk
   * fails the call after its earlier layers were written. */
  void (*on_layer)(void* user, uint32_t layer, void* event);
  void* on_layer_user;
} kvcache_fetch_options;
KVCACHE_EXPORT void kvcache_fetch_options_init(kvcache_fetch_options* options);

typedef struct {
  uint32_t gpu_tier_chunks, shared_memory_chunks, grpc_chunks, nccl_chunks;
  uint64_t bytes; /* compressed bytes carried */
  /* fetch_to_device: GPU time from the first copy to the first batch
   * decoded. */
  float first_batch_ms;
} kvcache_fetch_report;

typedef enum { KVCACHE_FLOAT16 = 0, KVCACHE_BFLOAT16 = 1 } kvcache_dtype;

/* Where fetch() decodes one chunk: values[layers][2][tokens][channels] of
 * 16-bit patterns, C order, owned by the caller. */
typedef struct {
  uint16_t* values;
  uint32_t layers, tokens, channels;
  /* 1: the caller holds float16 (a bfloat16 chunk is refused); 0: raw
   * 16-bit patterns of either dtype. */
  int32_t float16_only;
} kvcache_host_chunk;

/* Restores the chunks of keys (a prefix the node holds) into host memory,
 * decoded on the CPU. options and report may be NULL. INVALID_ARGUMENT if a
 * chunk's recorded shape differs from its kvcache_host_chunk (before it is
 * decoded into it); NOT_FOUND if a chunk is missing; DATA_LOSS for a
 * corrupt one. On an error earlier chunks may hold their values. */
KVCACHE_EXPORT int kvcache_fetch(kvcache_client* client, const uint8_t* keys,
                                 size_t n, const kvcache_host_chunk* out,
                                 const kvcache_fetch_options* options,
                                 kvcache_fetch_report* report);

/* Where an engine keeps its KV cache on the GPU. Element (layer, kv, token
 * slot s of block b, channel c) of a paged cache is at
 * layer_base[b * block_stride + kv * kv_stride + s * token_stride + c],
 * strides in 16-bit elements. */
typedef enum {
  /* Each chunk into a buffer of its own, [layers, 2, tokens, channels]. */
  KVCACHE_LAYOUT_CONTIGUOUS = 0,
  /* Blocks of block_tokens slots (vLLM, SGLang, FlashInfer). */
  KVCACHE_LAYOUT_PAGED = 1
} kvcache_layout_kind;

typedef struct {
  size_t struct_size;
  int32_t kind;  /* kvcache_layout_kind */
  int32_t dtype; /* kvcache_dtype */
  uint32_t layers, kv_heads, head_dim;
  /* Paged only. */
  uint32_t block_tokens, num_blocks;
  /* Exactly one of: a cache per layer, as a host array of `layers` device
   * addresses (copied at the call) or as a device array of them; or one
   * allocation for all layers, layer_stride elements apart. */
  const uint64_t* layer_bases;
  const uint64_t* device_layer_bases;
  uint64_t base;
  /* 0: the default of a per-layer cache [num_blocks, 2, block_tokens,
   * kv_heads, head_dim] (for base, layers one after another). */
  int64_t token_stride, kv_stride, block_stride, layer_stride;
} kvcache_device_layout;
KVCACHE_EXPORT void kvcache_device_layout_init(kvcache_device_layout* layout);

/* One chunk's place in a layout. */
typedef struct {
  uint32_t tokens; /* the last chunk of a prompt may be shorter */
  /* Contiguous: the chunk's buffer on the GPU. */
  uint64_t values;
  /* Paged: token t goes to slot first_slot + t of the blocks listed, as a
   * host array of n_block_ids ids (copied at the call; at least
   * ceil((first_slot + tokens) / block_tokens)) or a device int32 array. */
  const int32_t* block_ids;
  uint32_t n_block_ids;
  uint64_t device_block_ids;
  uint32_t first_slot;
} kvcache_device_chunk;

/* Restores the chunks of keys straight into the engine's GPU cache: copied
 * to the GPU (from the node's memory in place on this host, by NCCL from
 * the node's GPU tier, else over gRPC) and decoded there on `stream` (a
 * cudaStream_t; NULL is the default stream). Returns when the decode is
 * done. All addresses must be on one GPU; the call runs on it.
 * FAILED_PRECONDITION on a host without a GPU; INVALID_ARGUMENT for a
 * malformed layout or chunk, or an address that is not GPU memory, before
 * anything is fetched; DATA_LOSS if the GPU rejects a chunk (corrupt, or of
 * another shape than the layout), whose blocks are left untouched. */
KVCACHE_EXPORT int kvcache_fetch_to_device(kvcache_client* client,
                                           const uint8_t* keys, size_t n,
                                           const kvcache_device_layout* layout,
                                           const kvcache_device_chunk* chunks,
                                           void* stream,
                                           const kvcache_fetch_options* options,
                                           kvcache_fetch_report* report);

/* Makes `stream` (a cudaStream_t; NULL: the default stream) wait, on the
 * GPU, for `event`: an event on_layer gave, so that work queued on the
 * stream afterwards sees that layer. INVALID_ARGUMENT for a null event. */
KVCACHE_EXPORT int kvcache_stream_wait_event(void* stream, void* event);

/* ---- Storing from the GPU ---- */

typedef struct kvcache_storer kvcache_storer;

typedef struct {
  size_t struct_size;
  const char* level;     /* codec level; default "near-lossless" */
  uint32_t chunk_tokens; /* the longest chunk stored; default 256 */
  uint32_t batch_chunks; /* chunks encoded per launch; default 8 */
  uint32_t slots;        /* launches in flight; default 2 */
} kvcache_storer_options;
KVCACHE_EXPORT void kvcache_storer_options_init(
    kvcache_storer_options* options);

/* A storer that encodes chunks on the GPU from `layout` (a host list of
 * layer bases is copied to the GPU once, here) and puts them in the
 * background. options may be NULL. FAILED_PRECONDITION without a GPU. */
KVCACHE_EXPORT int kvcache_storer_create(kvcache_client* client,
                                         const kvcache_device_layout* layout,
                                         const kvcache_storer_options* options,
                                         kvcache_storer** storer);
/* Queues storing the chunks of keys from their places, encoded on `stream`
 * behind the work already queued there; *ticket names them. Chunk i names
 * key i - 1 as its parent, the first `parent` (32 bytes, or NULL for a
 * prompt's first chunk). Returns once the encode is queued. */
KVCACHE_EXPORT int kvcache_storer_store(kvcache_storer* storer,
                                        const uint8_t* keys, size_t n,
                                        const kvcache_device_chunk* chunks,
                                        void* stream, const uint8_t* parent,
                                        double pin_ttl_s, uint64_t* ticket);

typedef struct {
  uint64_t chunks, raw_bytes, stored_bytes;
} kvcache_store_report;
/* Waits until a ticket's chunks are stored; a ticket is waited for once. A
 * chunk the GPU could not read fails the ticket, and none of its later
 * chunks is stored. report may be NULL. */
KVCACHE_EXPORT int kvcache_storer_wait(kvcache_storer* storer, uint64_t ticket,
                                       kvcache_store_report* report);
/* Device memory the storer's slots hold. */
KVCACHE_EXPORT uint64_t
kvcache_storer_device_bytes(const kvcache_storer* storer);
/* Waits for what is queued, then frees it; NULL is fine. */
KVCACHE_EXPORT void kvcache_storer_free(kvcache_storer* storer);

/* ---- The codec ---- */

typedef struct {
  uint32_t layers, tokens, kv_heads, head_dim;
  int32_t dtype; /* kvcache_dtype */
} kvcache_chunk_shape;

/* Compresses one chunk, values[layers][2][tokens][kv_heads * head_dim] of
 * n_values 16-bit patterns, at `level` ("lossless", "near-lossless",
 * "high", "default", "compact", "tiny"; the transform levels take
 * kvcache_encode_with_profile). */
KVCACHE_EXPORT int kvcache_encode(const kvcache_chunk_shape* shape,
                                  const uint16_t* values, size_t n_values,
                                  const char* level, kvcache_buffer** stream);
/* The shape a stream records, after checking its header. */
KVCACHE_EXPORT int kvcache_peek_shape(const void* stream, size_t size,
                                      kvcache_chunk_shape* shape);
/* Decodes a stream into values (n_values, exactly as its shape says).
 * DATA_LOSS for a corrupt or truncated stream; FAILED_PRECONDITION for a
 * transform stream (kvcache_decode_with_profile). */
KVCACHE_EXPORT int kvcache_decode(const void* stream, size_t size,
                                  uint16_t* values, size_t n_values);

/* ---- Model profiles (ABI version 2) ----
 *
 * The transform levels ("profile-fine", "profile-balanced",
 * "profile-small") code a model's KV in the principal components of its
 * heads, which a profile of the model holds (kvcodec calibrate makes one).
 * A profile is named by its content: its id, 32 hex digits. kvcache keeps
 * a model's profiles beside its chunks, under the key space's namespace and
 * model id (the other fields do not matter), and the id of its current
 * one; a client fetches each profile once and keeps it. */

typedef struct kvcache_profile kvcache_profile;
/* Parses a profile's bytes. DATA_LOSS if they are not a valid profile. */
KVCACHE_EXPORT int kvcache_profile_parse(const void* bytes, size_t size,
                                         kvcache_profile** profile);
/* Its bytes, as kvcache_profile_parse takes them. */
KVCACHE_EXPORT int kvcache_profile_bytes(const kvcache_profile* profile,
                                         kvcache_buffer** bytes);
/* Its id and a NUL into id_hex. */
KVCACHE_EXPORT int kvcache_profile_id(const kvcache_profile* profile,
                                      char id_hex[33]);
KVCACHE_EXPORT void kvcache_profile_free(kvcache_profile* profile);
/* Stores the profile in kvcache and makes it the model's current one. */
KVCACHE_EXPORT int kvcache_profile_publish(kvcache_client* client,
                                           const kvcache_key_space* space,
                                           const kvcache_profile* profile);
/* The model's profile with id `id_hex`, or its current one if id_hex is
 * NULL. NOT_FOUND if kvcache holds none; DATA_LOSS if what it holds is not
 * that profile. */
KVCACHE_EXPORT int kvcache_profile_get(kvcache_client* client,
                                       const kvcache_key_space* space,
                                       const char* id_hex,
                                       kvcache_profile** profile);
/* The id of the profile a stream needs into id_hex; NOT_FOUND if it needs
 * none. */
KVCACHE_EXPORT int kvcache_stream_profile_id(const void* stream, size_t size,
                                             char id_hex[33]);
/* kvcache_encode at any level; the transform levels need `profile` and the
 * position of the chunk's first token in its sequence. */
KVCACHE_EXPORT int kvcache_encode_with_profile(
    const kvcache_chunk_shape* shape, const uint16_t* values, size_t n_values,
    const char* level, const kvcache_profile* profile, uint32_t first_position,
    kvcache_buffer** stream);
/* kvcache_decode of any stream; a transform stream needs the profile it
 * names (FAILED_PRECONDITION naming it otherwise). */
KVCACHE_EXPORT int kvcache_decode_with_profile(const void* stream, size_t size,
                                               uint16_t* values,
                                               size_t n_values,
                                               const kvcache_profile* profile);

#ifdef __cplusplus
}
#endif

#endif /* KVCACHE_CLIENT_C_KVCACHE_H_ */
