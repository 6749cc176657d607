"""Hugging Face transformers integration: keep a model's prompt KV in
kvcache, and start the next generate() from the longest cached prefix.

    cache = kvcache.hf.PrefixCache(client, model, "my-org/my-model")
    past, cached = cache.restore(input_ids)          # (None, 0) on a miss
    out = model.generate(input_ids, past_key_values=past, ...)
    cache.save(input_ids, out.past_key_values)       # the prompt's chunks

A prompt's full chunks (chunk_tokens each) are stored under keys that chain
the whole prefix (kvcache.chunk_keys), so any later prompt that starts with
the same tokens finds them. On a GPU the KV is encoded on the GPU and
decoded straight into the new cache's memory (Client.storer and
Client.fetch_to_device); on the CPU it goes through encode/put and fetch.

The model must keep full attention over 16-bit KV (float16 or bfloat16), as
Llama, Mistral, Qwen and most decoder-only models do; caches of sliding-
window or linear-attention layers are refused.
"""

import torch
from transformers import DynamicCache

import kvcache

_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _layers_of(cache):
    """[(keys, values)] per layer, each [batch, kv_heads, tokens, head_dim],
    from a DynamicCache (or the legacy tuple of tuples)."""
    if hasattr(cache, "layers"):
        for layer in cache.layers:
            if type(layer).__name__ != "DynamicLayer":
                raise kvcache.InvalidArgumentError(
                    f"a {type(layer).__name__} cache layer: kvcache.hf keeps "
                    "full-attention layers only")
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v in cache]


def _tokens_of(input_ids):
    """A prompt's token ids as a list: a 1-D sequence, or a [1, n] tensor."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2:
            if input_ids.shape[0] != 1:
                raise kvcache.InvalidArgumentError(
                    "kvcache.hf keeps one prompt at a time (batch size 1), "
                    f"not {input_ids.shape[0]}")
            input_ids = input_ids[0]
        return input_ids.tolist()
    return list(input_ids)


class PrefixCache:
    """Saves and restores one model's prompt KV through a kvcache Client.

    client: a kvcache.Client.
    model: the transformers model (or its config), for the KV's shape.
    model_id: names the model and its weights in the keys: only workers
      running the same weights may share KV.
    chunk_tokens: tokens per chunk; a prompt's partial last chunk is not
      stored.
    level: the codec level saved chunks are encoded at ("lossless" keeps
      generation bit-identical; see kvcache's codec README for the others).
    name_space: part of the key space, e.g. to keep levels apart.
    pin_ttl_s: > 0 pins saved chunks that long (a chat between turns).
    """

    def __init__(self, client, model, model_id, chunk_tokens=256,
                 level="lossless", name_space="default", pin_ttl_s=0.0):
        config = getattr(model, "config", model)
        text = config.get_text_config(decoder=True)
        self.client = client
        self.config = config
        self.layers = text.num_hidden_layers
        self.kv_heads = (getattr(text, "num_key_value_heads", None) or
                         text.num_attention_heads)
        self.head_dim = (getattr(text, "head_dim", None) or
                         text.hidden_size // text.num_attention_heads)
        dtype = getattr(model, "dtype", None) or getattr(
            config, "torch_dtype", None)
        if dtype not in _DTYPES:
            raise kvcache.InvalidArgumentError(
                f"the model's KV is {dtype}; kvcache keeps float16 or "
                "bfloat16 KV")
        self.dtype = dtype
        self.model_id = model_id
        self.chunk_tokens = chunk_tokens
        self.level = level
        self.name_space = name_space
        self.pin_ttl_s = pin_ttl_s
        self._storers = {}  # by device index

    @property
    def _layout(self):
        return dict(layers=self.layers, kv_heads=self.kv_heads,
                    head_dim=self.head_dim, dtype=_DTYPES[self.dtype])

    def keys(self, input_ids):
        """The keys of the prompt's full chunks."""
        tokens = _tokens_of(input_ids)
        full = len(tokens) // self.chunk_tokens
        return kvcache.chunk_keys(
            tokens[:full * self.chunk_tokens], self.model_id,
            chunk_tokens=self.chunk_tokens, name_space=self.name_space,
            dtype=_DTYPES[self.dtype], layers=self.layers,
            kv_heads=self.kv_heads, head_dim=self.head_dim)

    def save(self, input_ids, past_key_values):
        """Stores the full chunks of the prompt `input_ids` from its cache
        (which may hold more tokens: the reply's), skipping those the node
        already holds. Returns {'chunks', 'raw_bytes', 'stored_bytes'} of
        what was stored."""
        layers = _layers_of(past_key_values)
        if len(layers) != self.layers:
            raise kvcache.InvalidArgumentError(
                f"the cache has {len(layers)} layers; the model {self.layers}")
        cached_tokens = layers[0][0].shape[-2]
        keys = self.keys(input_ids)
        keys = keys[:cached_tokens // self.chunk_tokens]
        held = self.client.cached_prefix(keys)
        report = {"chunks": 0, "raw_bytes": 0, "stored_bytes": 0}
        if held == len(keys):
            return report
        # [layers, 2, kv_heads, tokens, head_dim] of the chunks to store.
        first, end = held * self.chunk_tokens, len(keys) * self.chunk_tokens
        kv = torch.stack([torch.stack((k[0, :, first:end], v[0, :, first:end]))
                          for k, v in layers])
        chunks = [
            kv[:, :, :, i:i + self.chunk_tokens].permute(0, 1, 3, 2, 4)
            .contiguous()  # [layers, 2, tokens, kv_heads, head_dim]
            for i in range(0, end - first, self.chunk_tokens)
        ]
        parent = keys[held - 1] if held > 0 else None
        if kv.is_cuda:
            return self._save_on_gpu(keys[held:], chunks, parent, kv.device)
        streams = [
            kvcache.encode(c.view(torch.int16).numpy().view("uint16").reshape(
                self.layers, 2, self.chunk_tokens, -1), self.kv_heads,
                           self.head_dim, self.level, _DTYPES[self.dtype])
            for c in chunks
        ]
        self.client.put(keys[held:], streams, pin_ttl_s=self.pin_ttl_s)
        report["chunks"] = len(streams)
        report["raw_bytes"] = sum(c.numel() * 2 for c in chunks)
        report["stored_bytes"] = sum(len(s) for s in streams)
        return report

    def _save_on_gpu(self, keys, chunks, parent, device):
        if device.index not in self._storers:
            with torch.cuda.device(device):
                self._storers[device.index] = self.client.storer(
                    self._layout, level=self.level,
                    chunk_tokens=self.chunk_tokens)
        storer = self._storers[device.index]
        stream = torch.cuda.current_stream(device)
        ticket = storer.store(
            keys, [{"tokens": self.chunk_tokens, "values": c} for c in chunks],
            stream=stream, parent=parent, pin_ttl_s=self.pin_ttl_s)
        # The chunks' memory must outlive the encode, which wait() outlasts.
        return storer.wait(ticket)

    def restore(self, input_ids, device=None):
        """A DynamicCache holding the longest cached prefix of the prompt
        `input_ids`, and its length in tokens; (None, 0) if nothing is
        cached. At least one token of the prompt is left out, as generate()
        needs one to compute. device: where the cache goes (default: the
        first GPU, else the CPU).

        Pass the cache to generate() with the whole prompt: it computes only
        the tokens after the prefix. A chunk evicted between lookup and
        fetch makes it (None, 0) too: the prompt is then computed whole.
        """
        tokens = _tokens_of(input_ids)
        usable = (len(tokens) - 1) // self.chunk_tokens
        keys = self.keys(tokens)[:usable]
        cached = self.client.cached_prefix(keys) if keys else 0
        if cached == 0:
            return None, 0
        if device is None:
            device = torch.device("cuda" if torch.cuda.is_available() else
                                  "cpu")
        device = torch.device(device)
        n = cached * self.chunk_tokens
        channels = self.kv_heads * self.head_dim
        # [chunk, layers, 2, tokens, channels]: what the codec writes.
        out = torch.empty((cached, self.layers, 2, self.chunk_tokens,
                           channels), dtype=self.dtype, device=device)
        try:
            if device.type == "cuda":
                with torch.cuda.device(device):
                    self.client.fetch_to_device(
                        keys[:cached], self._layout,
                        [{"tokens": self.chunk_tokens, "values": out[i]}
                         for i in range(cached)],
                        stream=torch.cuda.current_stream(device))
            else:
                bits = out.view(torch.int16).numpy().view("uint16")
                self.client.fetch(keys[:cached], list(bits))
        except kvcache.NotFoundError:
            return None, 0
        # -> [layers, 2, kv_heads, tokens, head_dim] per layer, batch 1.
        kv = (out.view(cached, self.layers, 2, self.chunk_tokens,
                       self.kv_heads, self.head_dim)
              .permute(1, 2, 4, 0, 3, 5)
              .reshape(self.layers, 2, self.kv_heads, n, self.head_dim))
        cache = DynamicCache(
            [(kv[l, 0].unsqueeze(0), kv[l, 1].unsqueeze(0))
             for l in range(self.layers)], config=self.config)
        return cache, n
