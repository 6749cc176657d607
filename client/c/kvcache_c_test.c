/* The C ABI's test, written in C and linked against libkvcache.so: every
 * call against a real kvcached on loopback (argv[1] is its binary), the
 * codec, and each kind of bad argument the ABI must refuse with a clear
 * status. */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "client/c/kvcache.h"

extern char** environ;

static int failures = 0;

#define EXPECT(cond)                                                     \
  do {                                                                   \
    if (!(cond)) {                                                       \
      fprintf(stderr, "%s:%d: expected %s (last error: %s)\n", __FILE__, \
              __LINE__, #cond, kvcache_last_error());                    \
      ++failures;                                                        \
    }                                                                    \
  } while (0)

/* A status, and that the message says something about it. */
#define EXPECT_STATUS(call, code, fragment)                                  \
  do {                                                                       \
    int s_ = (call);                                                         \
    if (s_ != (code) || strstr(kvcache_last_error(), (fragment)) == NULL) {  \
      fprintf(stderr, "%s:%d: %s gave %s \"%s\"; expected %s with \"%s\"\n", \
              __FILE__, __LINE__, #call, kvcache_status_name(s_),            \
              kvcache_last_error(), kvcache_status_name(code), fragment);    \
      ++failures;                                                            \
    }                                                                        \
  } while (0)

#define LAYERS 3
#define KV_HEADS 2
#define HEAD_DIM 16
#define CHANNELS (KV_HEADS * HEAD_DIM)
#define CHUNK_TOKENS 64

/* float to IEEE half (round to nearest even), for values well inside
 * half's normal range. */
static uint16_t ToHalf(float f) {
  union {
    float f;
    uint32_t u;
  } v = {f};
  const uint32_t sign = (v.u >> 16) & 0x8000u;
  const int32_t exponent = (int32_t)((v.u >> 23) & 0xff) - 127 + 15;
  uint32_t mantissa = v.u & 0x7fffffu;
  if (exponent <= 0) return (uint16_t)sign;
  uint32_t h = sign | ((uint32_t)exponent << 10) | (mantissa >> 13);
  const uint32_t rest = mantissa & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return (uint16_t)h;
}

static float FromHalf(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  union {
    uint32_t u;
    float f;
  } v;
  if (exponent == 0) {
    v.f = ldexpf((float)mantissa, -24);
    v.u |= sign;
    return v.f;
  }
  v.u = sign | ((exponent - 15 + 127) << 23) | (mantissa << 13);
  return v.f;
}

/* A chunk of smooth KV-like values: per-channel scale, slow drift over
 * tokens. */
static uint16_t* MakeChunk(uint32_t tokens, int seed) {
  const size_t n = (size_t)LAYERS * 2 * tokens * CHANNELS;
  uint16_t* values = malloc(n * sizeof(uint16_t));
  size_t i = 0;
  for (int l = 0; l < LAYERS; ++l) {
    for (int kv = 0; kv < 2; ++kv) {
      for (uint32_t t = 0; t < tokens; ++t) {
        for (int c = 0; c < CHANNELS; ++c) {
          const float scale = 0.5f + (float)((c * 7 + l) % 5);
          values[i++] = ToHalf(scale * sinf(0.05f * (float)(t + 31 * seed) +
                                            0.3f * (float)c + (float)kv));
        }
      }
    }
  }
  return values;
}

/* An on_layer callback for a call that must refuse it. */
static void ignore_layer(void* user, uint32_t layer, void* event) {
  (void)user;
  (void)layer;
  (void)event;
}

static pid_t daemon_pid = 0;

/* Starts kvcached on a free loopback port; writes "127.0.0.1:PORT". */
static int StartDaemon(const char* binary, char* address, size_t size) {
  const char* tmp = getenv("TEST_TMPDIR");
  char port_file[512];
  snprintf(port_file, sizeof(port_file), "%s/kvcached.port",
           tmp != NULL ? tmp : "/tmp");
  unlink(port_file);
  char port_flag[600];
  snprintf(port_flag, sizeof(port_flag), "--port_file=%s", port_file);
  char* argv[] = {(char*)binary, "--listen=127.0.0.1:0", port_flag, NULL};
  if (posix_spawn(&daemon_pid, binary, NULL, NULL, argv, environ) != 0) {
    perror("posix_spawn");
    return -1;
  }
  for (int i = 0; i < 600; ++i) {
    FILE* f = fopen(port_file, "r");
    if (f != NULL) {
      int port = 0;
      const int read = fscanf(f, "%d", &port);
      fclose(f);
      if (read == 1 && port > 0) {
        snprintf(address, size, "127.0.0.1:%d", port);
        return 0;
      }
    }
    usleep(50 * 1000);
  }
  return -1;
}

static void StopDaemon(void) {
  if (daemon_pid > 0) {
    kill(daemon_pid, SIGTERM);
    waitpid(daemon_pid, NULL, 0);
  }
}

static void TestVersionAndNames(void) {
  EXPECT(kvcache_abi_version() == KVCACHE_ABI_VERSION);
  EXPECT(strcmp(kvcache_status_name(KVCACHE_NOT_FOUND), "NOT_FOUND") == 0);
  EXPECT(strcmp(kvcache_status_name(99), "UNKNOWN") == 0);
  EXPECT(strcmp(kvcache_tier_name(42), "TIER_UNSPECIFIED") == 0);
  EXPECT(strcmp(kvcache_tier_name(KVCACHE_TIER_CPU), "TIER_CPU") == 0);
}

static void TestChunkKeys(void) {
  int32_t tokens[200];
  for (int i = 0; i < 200; ++i) tokens[i] = 1000 + i;
  kvcache_key_space space;
  kvcache_key_space_init(&space);
  space.model_id = "test/model";
  space.chunk_tokens = CHUNK_TOKENS;
  uint8_t keys[4 * KVCACHE_KEY_BYTES];
  size_t n = 0;
  EXPECT(kvcache_chunk_keys(&space, tokens, 200, keys, 4, &n) == KVCACHE_OK);
  EXPECT(n == 4); /* 64 + 64 + 64 + 8 */

  /* Keys chain the prefix: a change at token 130 (chunk 2) keeps chunks 0
   * and 1 and changes every key from chunk 2 on. */
  tokens[130] = 7;
  uint8_t changed[4 * KVCACHE_KEY_BYTES];
  EXPECT(kvcache_chunk_keys(&space, tokens, 200, changed, 4, &n) == KVCACHE_OK);
  EXPECT(memcmp(keys, changed, 2 * KVCACHE_KEY_BYTES) == 0);
  EXPECT(memcmp(keys + 2 * KVCACHE_KEY_BYTES, changed + 2 * KVCACHE_KEY_BYTES,
                KVCACHE_KEY_BYTES) != 0);
  EXPECT(memcmp(keys + 3 * KVCACHE_KEY_BYTES, changed + 3 * KVCACHE_KEY_BYTES,
                KVCACHE_KEY_BYTES) != 0);

  /* Another model, other keys. */
  space.model_id = "test/other";
  EXPECT(kvcache_chunk_keys(&space, tokens, 200, changed, 4, &n) == KVCACHE_OK);
  EXPECT(memcmp(keys, changed, KVCACHE_KEY_BYTES) != 0);

  EXPECT_STATUS(kvcache_chunk_keys(&space, tokens, 200, keys, 2, &n),
                KVCACHE_INVALID_ARGUMENT, "room for 2");
  EXPECT(n == 4);
  space.model_id = NULL;
  EXPECT_STATUS(kvcache_chunk_keys(&space, tokens, 200, keys, 4, &n),
                KVCACHE_INVALID_ARGUMENT, "model");
  space.struct_size = 0;
  EXPECT_STATUS(kvcache_chunk_keys(&space, tokens, 200, keys, 4, &n),
                KVCACHE_INVALID_ARGUMENT, "_init");
}

static kvcache_buffer* Encode(const uint16_t* values, uint32_t tokens,
                              const char* level) {
  kvcache_chunk_shape shape = {LAYERS, tokens, KV_HEADS, HEAD_DIM,
                               KVCACHE_FLOAT16};
  kvcache_buffer* stream = NULL;
  const size_t n = (size_t)LAYERS * 2 * tokens * CHANNELS;
  EXPECT(kvcache_encode(&shape, values, n, level, &stream) == KVCACHE_OK);
  return stream;
}

static void TestCodec(void) {
  const uint32_t tokens = 40;
  const size_t n = (size_t)LAYERS * 2 * tokens * CHANNELS;
  uint16_t* values = MakeChunk(tokens, 1);
  uint16_t* decoded = malloc(n * sizeof(uint16_t));

  kvcache_buffer* lossless = Encode(values, tokens, "lossless");
  kvcache_chunk_shape shape;
  EXPECT(kvcache_peek_shape(kvcache_buffer_data(lossless),
                            kvcache_buffer_size(lossless),
                            &shape) == KVCACHE_OK);
  EXPECT(shape.layers == LAYERS && shape.tokens == tokens &&
         shape.kv_heads == KV_HEADS && shape.head_dim == HEAD_DIM &&
         shape.dtype == KVCACHE_FLOAT16);
  EXPECT(kvcache_decode(kvcache_buffer_data(lossless),
                        kvcache_buffer_size(lossless), decoded,
                        n) == KVCACHE_OK);
  EXPECT(memcmp(values, decoded, n * sizeof(uint16_t)) == 0);

  /* near-lossless: smaller, and within 10-bit quantization's error. */
  kvcache_buffer* near = Encode(values, tokens, "near-lossless");
  EXPECT(kvcache_buffer_size(near) < kvcache_buffer_size(lossless));
  EXPECT(kvcache_decode(kvcache_buffer_data(near), kvcache_buffer_size(near),
                        decoded, n) == KVCACHE_OK);
  float worst = 0;
  for (size_t i = 0; i < n; ++i) {
    const float e = fabsf(FromHalf(decoded[i]) - FromHalf(values[i]));
    if (e > worst) worst = e;
  }
  EXPECT(worst > 0 && worst < 0.02f);

  /* Damage is DATA_LOSS, never wrong values. */
  const size_t size = kvcache_buffer_size(lossless);
  uint8_t* damaged = malloc(size);
  memcpy(damaged, kvcache_buffer_data(lossless), size);
  damaged[size / 2] ^= 0x40;
  EXPECT_STATUS(kvcache_decode(damaged, size, decoded, n), KVCACHE_DATA_LOSS,
                "");
  EXPECT(kvcache_decode(kvcache_buffer_data(lossless), size / 3, decoded, n) ==
         KVCACHE_DATA_LOSS);
  EXPECT_STATUS(
      kvcache_decode(kvcache_buffer_data(lossless), size, decoded, n - 1),
      KVCACHE_INVALID_ARGUMENT, "values");

  kvcache_chunk_shape bad = {LAYERS, tokens, KV_HEADS, HEAD_DIM,
                             KVCACHE_FLOAT16};
  kvcache_buffer* out = NULL;
  EXPECT_STATUS(kvcache_encode(&bad, values, n - 1, "lossless", &out),
                KVCACHE_INVALID_ARGUMENT, "values");
  EXPECT_STATUS(kvcache_encode(&bad, values, n, "huge", &out),
                KVCACHE_INVALID_ARGUMENT, "huge");
  bad.dtype = 7;
  EXPECT_STATUS(kvcache_encode(&bad, values, n, "lossless", &out),
                KVCACHE_INVALID_ARGUMENT, "dtype");
  EXPECT(out == NULL);

  free(damaged);
  kvcache_buffer_free(near);
  kvcache_buffer_free(lossless);
  free(decoded);
  free(values);
}

/* The last error is the calling thread's own. */
/* A model profile's bytes (FORMAT.md, "Model profiles") for this test's
 * shape, made by hand: RoPE base 10000 on adjacent pairs, zero means, each
 * head's basis the identity with its channels in reverse order. */
static size_t ProfileBytes(uint8_t* out) {
  size_t n = 0;
#define PUT(bytes, count)            \
  do {                               \
    memcpy(out + n, (bytes), count); \
    n += (count);                    \
  } while (0)
  const uint8_t header[8] = {'K', 'V', 'C', 'P', 1, 1, 0, 0};
  const uint32_t dims[3] = {LAYERS, KV_HEADS, HEAD_DIM};
  PUT(header, 8);
  PUT(dims, 12);
  for (int j = 0; j < HEAD_DIM / 2; ++j) {
    const double f = pow(10000.0, -2.0 * j / HEAD_DIM);
    PUT(&f, 8);
  }
  const int heads = LAYERS * 2 * KV_HEADS;
  const float zero = 0.0f, one = 1.0f;
  for (int i = 0; i < heads * HEAD_DIM; ++i) PUT(&zero, 4);
  for (int h = 0; h < heads; ++h) {
    for (int k = 0; k < HEAD_DIM; ++k) {
      for (int d = 0; d < HEAD_DIM; ++d) {
        PUT(d == HEAD_DIM - 1 - k ? &one : &zero, 4);
      }
    }
  }
  for (int h = 0; h < heads; ++h) {
    for (int k = 0; k < HEAD_DIM; ++k) {
      const float variance = (float)(HEAD_DIM - k);
      PUT(&variance, 4);
    }
  }
#undef PUT
  return n;
}

enum {
  kProfileBytes = 20 + 8 * HEAD_DIM / 2 +
                  4 * LAYERS * 2 * KV_HEADS * HEAD_DIM * (HEAD_DIM + 2)
};

/* The transform levels: a profile parsed from its bytes, chunks encoded
 * with it and decoded only with it. */
static void TestProfileCodec(void) {
  static uint8_t bytes[kProfileBytes];
  EXPECT(ProfileBytes(bytes) == kProfileBytes);
  kvcache_profile* profile = NULL;
  EXPECT(kvcache_profile_parse(bytes, kProfileBytes, &profile) == KVCACHE_OK);
  if (profile == NULL) return;
  char id[33];
  EXPECT(kvcache_profile_id(profile, id) == KVCACHE_OK);
  EXPECT(strlen(id) == 32);
  kvcache_buffer* again = NULL;
  EXPECT(kvcache_profile_bytes(profile, &again) == KVCACHE_OK);
  EXPECT(kvcache_buffer_size(again) == kProfileBytes &&
         memcmp(kvcache_buffer_data(again), bytes, kProfileBytes) == 0);
  kvcache_buffer_free(again);
  kvcache_profile* bad = NULL;
  EXPECT_STATUS(kvcache_profile_parse(bytes, kProfileBytes - 1, &bad),
                KVCACHE_DATA_LOSS, "header implies");
  EXPECT(bad == NULL);

  const uint32_t tokens = 40;
  uint16_t* values = MakeChunk(tokens, 5);
  const size_t n = (size_t)LAYERS * 2 * tokens * CHANNELS;
  const kvcache_chunk_shape shape = {LAYERS, tokens, KV_HEADS, HEAD_DIM,
                                     KVCACHE_FLOAT16};
  kvcache_buffer* stream = NULL;
  EXPECT_STATUS(kvcache_encode(&shape, values, n, "profile-balanced", &stream),
                KVCACHE_INVALID_ARGUMENT, "needs a model profile");
  EXPECT(kvcache_encode_with_profile(&shape, values, n, "profile-balanced",
                                     profile, 100, &stream) == KVCACHE_OK);
  if (stream != NULL) {
    const uint8_t* data = kvcache_buffer_data(stream);
    const size_t size = kvcache_buffer_size(stream);
    char named[33];
    EXPECT(kvcache_stream_profile_id(data, size, named) == KVCACHE_OK);
    EXPECT(strcmp(named, id) == 0);
    uint16_t* decoded = malloc(n * sizeof(uint16_t));
    EXPECT_STATUS(kvcache_decode(data, size, decoded, n),
                  KVCACHE_FAILED_PRECONDITION, id);
    EXPECT(kvcache_decode_with_profile(data, size, decoded, n, profile) ==
           KVCACHE_OK);
    double err = 0, ref = 0;
    for (size_t i = 0; i < n; ++i) {
      const double d = FromHalf(decoded[i]) - FromHalf(values[i]);
      err += d * d;
      ref += (double)FromHalf(values[i]) * FromHalf(values[i]);
    }
    fprintf(stderr, "profile-balanced relative L2 error %.4f\n",
            sqrt(err / ref));
    EXPECT(err > 0 && sqrt(err / ref) < 0.3);
    free(decoded);
  }
  kvcache_buffer_free(stream);
  /* A stream of another level names no profile. */
  kvcache_buffer* plain = Encode(values, tokens, "high");
  char none[33];
  EXPECT_STATUS(kvcache_stream_profile_id(kvcache_buffer_data(plain),
                                          kvcache_buffer_size(plain), none),
                KVCACHE_NOT_FOUND, "no model profile");
  kvcache_buffer_free(plain);
  free(values);
  kvcache_profile_free(profile);
}

static kvcache_client* Connect(const char* address);

/* Profiles kept in kvcache: published by one client, fetched by id or as
 * the model's current one by another, and apart per model. */
static void TestProfileStore(const char* address) {
  kvcache_client* client = Connect(address);
  if (client == NULL) return;
  static uint8_t bytes[kProfileBytes];
  ProfileBytes(bytes);
  kvcache_profile* profile = NULL;
  EXPECT(kvcache_profile_parse(bytes, kProfileBytes, &profile) == KVCACHE_OK);
  if (profile == NULL) return;
  kvcache_key_space space;
  kvcache_key_space_init(&space);
  space.model_id = "test/c-abi-profiles";
  kvcache_profile* got = NULL;
  EXPECT_STATUS(kvcache_profile_get(client, &space, NULL, &got),
                KVCACHE_NOT_FOUND, "");
  EXPECT(kvcache_profile_publish(client, &space, profile) == KVCACHE_OK);
  kvcache_client* other = Connect(address);
  char id[33], fetched[33];
  kvcache_profile_id(profile, id);
  EXPECT(kvcache_profile_get(other, &space, NULL, &got) == KVCACHE_OK);
  if (got != NULL) {
    EXPECT(kvcache_profile_id(got, fetched) == KVCACHE_OK);
    EXPECT(strcmp(fetched, id) == 0);
    kvcache_profile_free(got);
    got = NULL;
  }
  EXPECT(kvcache_profile_get(other, &space, id, &got) == KVCACHE_OK);
  kvcache_profile_free(got);
  got = NULL;
  EXPECT_STATUS(kvcache_profile_get(other, &space, "xyz", &got),
                KVCACHE_INVALID_ARGUMENT, "32 hex digits");
  space.model_id = "test/another-model";
  EXPECT_STATUS(kvcache_profile_get(other, &space, id, &got), KVCACHE_NOT_FOUND,
                id);
  EXPECT(got == NULL);
  kvcache_client_free(other);
  kvcache_client_free(client);
  kvcache_profile_free(profile);
}

static void* FailOnAnotherThread(void* unused) {
  (void)unused;
  kvcache_chunk_shape shape;
  kvcache_peek_shape("x", 1, &shape);
  return NULL;
}

static void TestErrorsArePerThread(void) {
  kvcache_buffer* out = NULL;
  EXPECT(kvcache_encode(NULL, NULL, 0, "lossless", &out) ==
         KVCACHE_INVALID_ARGUMENT);
  char mine[256];
  snprintf(mine, sizeof(mine), "%s", kvcache_last_error());
  pthread_t thread;
  pthread_create(&thread, NULL, FailOnAnotherThread, NULL);
  pthread_join(thread, NULL);
  EXPECT(strcmp(mine, kvcache_last_error()) == 0);
  EXPECT(strstr(mine, "shape is NULL") != NULL);
}

static void TestUnreachable(void) {
  kvcache_client_options options;
  kvcache_client_options_init(&options);
  options.address = "127.0.0.1:1";
  options.connect_timeout_s = 0.3;
  kvcache_client* client = (kvcache_client*)0x1;
  EXPECT_STATUS(kvcache_connect(&options, &client), KVCACHE_UNAVAILABLE,
                "127.0.0.1:1");
  EXPECT(client == NULL);
}

static kvcache_client* Connect(const char* address) {
  kvcache_client_options options;
  kvcache_client_options_init(&options);
  options.address = address;
  kvcache_client* client = NULL;
  EXPECT(kvcache_connect(&options, &client) == KVCACHE_OK);
  return client;
}

static void TestAgainstDaemon(const char* address) {
  kvcache_client* client = Connect(address);
  if (client == NULL) return;

  /* A 150-token prompt: chunks of 64, 64 and 22 tokens. */
  enum { kChunks = 3 };
  const uint32_t tokens[kChunks] = {64, 64, 22};
  int32_t prompt[150];
  for (int i = 0; i < 150; ++i) prompt[i] = 50 + 3 * i;
  kvcache_key_space space;
  kvcache_key_space_init(&space);
  space.model_id = "test/c-abi";
  space.chunk_tokens = CHUNK_TOKENS;
  uint8_t keys[kChunks * KVCACHE_KEY_BYTES];
  size_t n = 0;
  EXPECT(kvcache_chunk_keys(&space, prompt, 150, keys, kChunks, &n) ==
         KVCACHE_OK);

  size_t prefix = 99;
  EXPECT(kvcache_lookup(client, keys, kChunks, &prefix, NULL) == KVCACHE_OK);
  EXPECT(prefix == 0);

  uint16_t* values[kChunks];
  kvcache_buffer* streams[kChunks];
  const void* chunks[kChunks];
  size_t sizes[kChunks];
  for (int i = 0; i < kChunks; ++i) {
    values[i] = MakeChunk(tokens[i], 10 + i);
    streams[i] = Encode(values[i], tokens[i], "lossless");
    chunks[i] = kvcache_buffer_data(streams[i]);
    sizes[i] = kvcache_buffer_size(streams[i]);
  }
  EXPECT(kvcache_put(client, keys, kChunks, chunks, sizes, NULL) == KVCACHE_OK);

  kvcache_chunk_info infos[kChunks];
  EXPECT(kvcache_lookup(client, keys, kChunks, &prefix, infos) == KVCACHE_OK);
  EXPECT(prefix == kChunks);
  for (int i = 0; i < kChunks; ++i) {
    EXPECT(infos[i].size_bytes == sizes[i]);
    EXPECT(infos[i].tier == KVCACHE_TIER_CPU);
    EXPECT(infos[i].pinned == 0);
  }

  kvcache_buffer* got[kChunks];
  EXPECT(kvcache_get(client, keys, kChunks, got) == KVCACHE_OK);
  for (int i = 0; i < kChunks; ++i) {
    EXPECT(kvcache_buffer_size(got[i]) == sizes[i]);
    EXPECT(memcmp(kvcache_buffer_data(got[i]), chunks[i], sizes[i]) == 0);
    kvcache_buffer_free(got[i]);
  }

  /* fetch decodes into the caller's buffers, bit-exact for lossless. */
  kvcache_host_chunk out[kChunks];
  uint16_t* restored[kChunks];
  for (int i = 0; i < kChunks; ++i) {
    const size_t count = (size_t)LAYERS * 2 * tokens[i] * CHANNELS;
    restored[i] = calloc(count, sizeof(uint16_t));
    out[i] = (kvcache_host_chunk){restored[i], LAYERS, tokens[i], CHANNELS, 1};
  }
  kvcache_fetch_options fetch;
  kvcache_fetch_options_init(&fetch);
  fetch.transport = KVCACHE_TRANSPORT_GRPC;
  kvcache_fetch_report report;
  EXPECT(kvcache_fetch(client, keys, kChunks, out, &fetch, &report) ==
         KVCACHE_OK);
  EXPECT(report.grpc_chunks == kChunks);
  EXPECT(report.bytes == sizes[0] + sizes[1] + sizes[2]);
  for (int i = 0; i < kChunks; ++i) {
    const size_t count = (size_t)LAYERS * 2 * tokens[i] * CHANNELS;
    EXPECT(memcmp(restored[i], values[i], count * sizeof(uint16_t)) == 0);
  }
  /* Buffers of another shape are refused before decoding into them. */
  out[2].tokens = 11;
  out[2].channels = 2 * CHANNELS;
  EXPECT_STATUS(kvcache_fetch(client, keys, kChunks, out, &fetch, NULL),
                KVCACHE_INVALID_ARGUMENT, "layers, channels");
  out[2].channels = CHANNELS;
  EXPECT_STATUS(kvcache_fetch(client, keys, kChunks, out, &fetch, NULL),
                KVCACHE_INVALID_ARGUMENT, "chunk 2 is [3, 2, 22, 32]");
  out[2].tokens = tokens[2];
  fetch.transport = 9;
  EXPECT_STATUS(kvcache_fetch(client, keys, kChunks, out, &fetch, NULL),
                KVCACHE_INVALID_ARGUMENT, "transport");
  fetch.transport = KVCACHE_TRANSPORT_GRPC;
  fetch.lease_s = 0;
  EXPECT_STATUS(kvcache_fetch(client, keys, kChunks, out, &fetch, NULL),
                KVCACHE_INVALID_ARGUMENT, "lease_s");
  fetch.lease_s = 30;
  /* Layer by layer is for the GPU path. */
  fetch.on_layer = ignore_layer;
  EXPECT_STATUS(kvcache_fetch(client, keys, kChunks, out, &fetch, NULL),
                KVCACHE_INVALID_ARGUMENT, "on_layer is for");
  fetch.on_layer = NULL;
  EXPECT_STATUS(kvcache_stream_wait_event(NULL, NULL), KVCACHE_INVALID_ARGUMENT,
                "event");

  /* The device path checks its arguments first, then needs a GPU. */
  kvcache_device_layout layout;
  kvcache_device_layout_init(&layout);
  layout.layers = LAYERS;
  layout.kv_heads = KV_HEADS;
  layout.head_dim = HEAD_DIM;
  kvcache_device_chunk device_chunks[kChunks];
  memset(device_chunks, 0, sizeof(device_chunks));
  for (int i = 0; i < kChunks; ++i) {
    device_chunks[i].tokens = tokens[i];
    device_chunks[i].values = (uint64_t)(uintptr_t)restored[i];
  }
  layout.kind = KVCACHE_LAYOUT_PAGED;
  EXPECT_STATUS(kvcache_fetch_to_device(client, keys, kChunks, &layout,
                                        device_chunks, NULL, NULL, NULL),
                KVCACHE_INVALID_ARGUMENT, "block_tokens");
  layout.block_tokens = 16;
  layout.num_blocks = 32;
  EXPECT_STATUS(kvcache_fetch_to_device(client, keys, kChunks, &layout,
                                        device_chunks, NULL, NULL, NULL),
                KVCACHE_INVALID_ARGUMENT, "exactly one of layer_bases");
  layout.base = 0x1000;
  EXPECT_STATUS(kvcache_fetch_to_device(client, keys, kChunks, &layout,
                                        device_chunks, NULL, NULL, NULL),
                KVCACHE_INVALID_ARGUMENT, "chunks[0].values is for");
  layout.base = 0;
  layout.block_tokens = 0;
  layout.num_blocks = 0;
  layout.kind = KVCACHE_LAYOUT_CONTIGUOUS;
  /* Host memory: no GPU here (FAILED_PRECONDITION), or a GPU that says it
   * is not its memory (INVALID_ARGUMENT). */
  const int device = kvcache_fetch_to_device(client, keys, kChunks, &layout,
                                             device_chunks, NULL, NULL, NULL);
  EXPECT((device == KVCACHE_FAILED_PRECONDITION &&
          strstr(kvcache_last_error(), "needs a CUDA GPU") != NULL) ||
         (device == KVCACHE_INVALID_ARGUMENT &&
          strstr(kvcache_last_error(), "not GPU memory") != NULL));

  double expiry = 0;
  EXPECT(kvcache_pin(client, keys, kChunks, 60, &expiry) == KVCACHE_OK);
  EXPECT(expiry > (double)time(NULL) + 50);
  EXPECT(kvcache_lookup(client, keys, kChunks, &prefix, infos) == KVCACHE_OK);
  EXPECT(infos[0].pinned == 1);
  EXPECT(kvcache_unpin(client, keys, kChunks) == KVCACHE_OK);
  EXPECT(kvcache_lookup(client, keys, kChunks, &prefix, infos) == KVCACHE_OK);
  EXPECT(infos[0].pinned == 0);
  EXPECT_STATUS(kvcache_pin(client, keys, kChunks, -1, NULL),
                KVCACHE_INVALID_ARGUMENT, "ttl_s");

  kvcache_stats stats;
  EXPECT(kvcache_get_stats(client, &stats) == KVCACHE_OK);
  EXPECT(stats.chunks == kChunks);
  EXPECT(stats.bytes_in == sizes[0] + sizes[1] + sizes[2]);

  /* Keep-first: a second put of other bytes keeps the first unless
   * replace is set. */
  const void* swapped[1] = {chunks[1]};
  size_t swapped_size[1] = {sizes[1]};
  kvcache_put_options put;
  kvcache_put_options_init(&put);
  EXPECT(kvcache_put(client, keys, 1, swapped, swapped_size, &put) ==
         KVCACHE_OK);
  EXPECT(kvcache_get(client, keys, 1, got) == KVCACHE_OK);
  EXPECT(kvcache_buffer_size(got[0]) == sizes[0]);
  kvcache_buffer_free(got[0]);
  put.replace = 1;
  EXPECT(kvcache_put(client, keys, 1, swapped, swapped_size, &put) ==
         KVCACHE_OK);
  EXPECT(kvcache_get(client, keys, 1, got) == KVCACHE_OK);
  EXPECT(kvcache_buffer_size(got[0]) == sizes[1]);
  kvcache_buffer_free(got[0]);

  uint32_t deleted = 0;
  EXPECT(kvcache_delete(client, keys, kChunks, &deleted) == KVCACHE_OK);
  EXPECT(deleted == kChunks);
  EXPECT(kvcache_lookup(client, keys, kChunks, &prefix, NULL) == KVCACHE_OK);
  EXPECT(prefix == 0);
  got[0] = (kvcache_buffer*)0x1;
  EXPECT_STATUS(kvcache_get(client, keys, kChunks, got), KVCACHE_NOT_FOUND, "");
  EXPECT(got[0] == NULL);
  EXPECT(kvcache_fetch(client, keys, kChunks, out, NULL, NULL) ==
         KVCACHE_NOT_FOUND);

  for (int i = 0; i < kChunks; ++i) {
    free(restored[i]);
    kvcache_buffer_free(streams[i]);
    free(values[i]);
  }
  kvcache_client_free(client);
}

/* Threads share one client. */
struct Worker {
  kvcache_client* client;
  int id;
  int ok;
};

static void* PutAndGet(void* arg) {
  struct Worker* w = arg;
  w->ok = 1;
  for (int round = 0; round < 20 && w->ok; ++round) {
    int32_t prompt[CHUNK_TOKENS];
    for (int i = 0; i < CHUNK_TOKENS; ++i) prompt[i] = w->id * 100000 + round;
    kvcache_key_space space;
    kvcache_key_space_init(&space);
    space.model_id = "test/threads";
    space.chunk_tokens = CHUNK_TOKENS;
    uint8_t key[KVCACHE_KEY_BYTES];
    size_t n = 0;
    uint16_t* values = MakeChunk(CHUNK_TOKENS, w->id * 100 + round);
    kvcache_chunk_shape shape = {LAYERS, CHUNK_TOKENS, KV_HEADS, HEAD_DIM,
                                 KVCACHE_FLOAT16};
    kvcache_buffer* stream = NULL;
    kvcache_buffer* got = NULL;
    const void* data = NULL;
    size_t size = 0;
    w->ok = kvcache_chunk_keys(&space, prompt, CHUNK_TOKENS, key, 1, &n) ==
                KVCACHE_OK &&
            kvcache_encode(&shape, values,
                           (size_t)LAYERS * 2 * CHUNK_TOKENS * CHANNELS,
                           "default", &stream) == KVCACHE_OK;
    if (w->ok) {
      data = kvcache_buffer_data(stream);
      size = kvcache_buffer_size(stream);
      w->ok =
          kvcache_put(w->client, key, 1, &data, &size, NULL) == KVCACHE_OK &&
          kvcache_get(w->client, key, 1, &got) == KVCACHE_OK &&
          kvcache_buffer_size(got) == size &&
          memcmp(kvcache_buffer_data(got), data, size) == 0;
    }
    kvcache_buffer_free(got);
    kvcache_buffer_free(stream);
    free(values);
  }
  return NULL;
}

static void TestThreads(const char* address) {
  kvcache_client* client = Connect(address);
  if (client == NULL) return;
  enum { kThreads = 4 };
  pthread_t threads[kThreads];
  struct Worker workers[kThreads];
  for (int i = 0; i < kThreads; ++i) {
    workers[i] = (struct Worker){client, i + 1, 0};
    pthread_create(&threads[i], NULL, PutAndGet, &workers[i]);
  }
  for (int i = 0; i < kThreads; ++i) {
    pthread_join(threads[i], NULL);
    EXPECT(workers[i].ok);
  }
  kvcache_client_free(client);
}

int main(int argc, char** argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s path/to/kvcached\n", argv[0]);
    return 2;
  }
  TestVersionAndNames();
  TestChunkKeys();
  TestCodec();
  TestProfileCodec();
  TestErrorsArePerThread();
  TestUnreachable();
  char address[64];
  if (StartDaemon(argv[1], address, sizeof(address)) != 0) {
    fprintf(stderr, "kvcached did not start\n");
    StopDaemon();
    return 1;
  }
  TestAgainstDaemon(address);
  TestThreads(address);
  TestProfileStore(address);
  StopDaemon();
  if (failures > 0) {
    fprintf(stderr, "%d expectations failed\n", failures);
    return 1;
  }
  printf("kvcache C ABI: all expectations held\n");
  return 0;
}
