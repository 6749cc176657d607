"""kvcache.hf with Hugging Face transformers, on a GPU host.

Llama-architecture models built from configs with fixed random weights (no
download): a small one with grouped-query attention in float16, and one
shaped like Llama-3-8B (4096 hidden, 32 heads, 8 KV heads of 128, its
vocabulary) with two layers, in bfloat16. For each, a prompt's KV is saved
through a real kvcached and restored into a new DynamicCache before
generate():

- lossless: the restored cache is bit-identical to the KV the model
  computed, and greedy generation from it gives the same tokens as
  generation from that KV kept on the GPU, with logits as close as the
  GPU's own kernels allow (they are not bit-reproducible from one call to
  the next: two runs from the same kept KV have differed by 0.031);
- lossy levels: logit differences and token agreement are reported;
- timing: restore against recomputing the prefix.

Needs PyTorch, transformers and a GPU: tests/gpu/run.sh runs it with the GPU
host's Python.
"""

import os
import statistics
import time
import unittest

# cuBLAS reduces in a fixed order only with a fixed workspace: without it
# two runs of one generate() can differ in the last bits of a logit, and
# "lossless" could not be told from "close".
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # pylint: disable=wrong-import-position
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # pylint: disable=wrong-import-position

import kvcache
import kvcache.hf
from kvcache_testing import start_daemon

NEW_TOKENS = 24


def make_model(dtype, **shape):
    config = LlamaConfig(**shape, max_position_embeddings=8192,
                         bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def kept_prefix(cache, tokens, config):
    """A DynamicCache of the first `tokens` of `cache`, as an engine that
    kept its KV on the GPU would hold it."""
    return DynamicCache(
        [(k[:, :, :tokens].clone(), v[:, :, :tokens].clone())
         for k, v, *_ in cache], config=config)


def generate(model, prompt, past):
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                         past_key_values=past, max_new_tokens=NEW_TOKENS,
                         min_new_tokens=NEW_TOKENS, do_sample=False,
                         output_logits=True, return_dict_in_generate=True,
                         pad_token_id=0)
    return out.sequences[0, prompt.shape[1]:].tolist(), torch.stack(
        out.logits).float()


def timed(function, rounds=5):
    """Median wall time of function() in ms, GPU work included."""
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


class HfTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        torch.use_deterministic_algorithms(True, warn_only=True)
        cls.daemon, cls.address = start_daemon()
        cls.client = kvcache.Client(cls.address)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.daemon.terminate()
        cls.daemon.wait(timeout=30)

    def check_model(self, name, model, prompt_tokens, chunk_tokens, levels):
        torch.manual_seed(1)
        vocab = model.config.vocab_size
        prompt = torch.randint(3, vocab, (1, prompt_tokens), device="cuda")
        with torch.no_grad():
            computed = model(prompt, use_cache=True).past_key_values
        full_chunks = (prompt_tokens - 1) // chunk_tokens
        prefix = full_chunks * chunk_tokens
        reference_tokens, reference_logits = generate(
            model, prompt, kept_prefix(computed, prefix, model.config))
        # What two runs from the same KV differ by (0 where the GPU's
        # kernels are deterministic): the bound for a lossless restore.
        _, again = generate(model, prompt,
                            kept_prefix(computed, prefix, model.config))
        run_to_run = (again - reference_logits).abs().max().item()
        plain_tokens, _ = generate(model, prompt, None)
        print(f"\n{name}: prompt {prompt_tokens} tokens, {full_chunks} "
              f"chunks of {chunk_tokens} cached; generation from kept KV "
              f"and from a whole prefill agree on "
              f"{sum(a == b for a, b in zip(reference_tokens, plain_tokens))}"
              f"/{NEW_TOKENS} tokens; run-to-run logit difference "
              f"{run_to_run:.4g}")

        for level in levels:
            cache = kvcache.hf.PrefixCache(
                self.client, model, f"test/{name}", chunk_tokens=chunk_tokens,
                level=level, name_space=level)
            saved = cache.save(prompt, computed)
            self.assertEqual(saved["chunks"], prompt_tokens // chunk_tokens)
            # Saving again stores nothing: the node holds the chunks.
            self.assertEqual(cache.save(prompt, computed)["chunks"], 0)
            restored, tokens = cache.restore(prompt)
            self.assertEqual(tokens, prefix)
            for (k, v, *_), (rk, rv, *_) in zip(computed, restored):
                self.assertEqual(rk.shape, (1, cache.kv_heads, prefix,
                                            cache.head_dim))
                if level == "lossless":
                    self.assertTrue(torch.equal(rk, k[:, :, :prefix]))
                    self.assertTrue(torch.equal(rv, v[:, :, :prefix]))
            got_tokens, got_logits = generate(model, prompt, restored)
            agree = sum(a == b for a, b in zip(got_tokens, reference_tokens))
            difference = (got_logits - reference_logits).abs().max().item()
            print(f"  {level}: {saved['stored_bytes'] / 2**20:.2f} MiB stored "
                  f"for {saved['raw_bytes'] / 2**20:.2f} MiB of KV "
                  f"({saved['raw_bytes'] / saved['stored_bytes']:.2f}x); "
                  f"{agree}/{NEW_TOKENS} tokens as from kept KV; largest "
                  f"logit difference {difference:.4g}")
            if level == "lossless":
                self.assertEqual(got_tokens, reference_tokens)
                # Identical KV in; what differs is the kernels' rounding,
                # a few units in the last place of the largest logit.
                eps = torch.finfo(model.dtype).eps
                scale = reference_logits.abs().max().item()
                self.assertLessEqual(difference,
                                     max(run_to_run, 8 * eps * scale))
            else:
                self.assertTrue(torch.isfinite(got_logits).all())
                self.assertLess(saved["stored_bytes"], saved["raw_bytes"])

            if level == levels[0]:
                restore_ms = timed(lambda: cache.restore(prompt))
                with torch.no_grad():
                    recompute_ms = timed(
                        lambda: model(prompt[:, :prefix], use_cache=True))
                print(f"  restore of {prefix} tokens ({level}): "
                      f"{restore_ms:.2f} ms; recomputing them: "
                      f"{recompute_ms:.2f} ms")

        # A prompt sharing only the first chunk finds that one.
        cache = kvcache.hf.PrefixCache(self.client, model, f"test/{name}",
                                       chunk_tokens=chunk_tokens,
                                       name_space=levels[0], level=levels[0])
        other = prompt.clone()
        other[0, chunk_tokens + 3] = (other[0, chunk_tokens + 3] + 1) % vocab
        self.assertEqual(cache.restore(other)[1], chunk_tokens)
        # Another model id, or a prompt no longer than a chunk: nothing.
        elsewhere = kvcache.hf.PrefixCache(self.client, model, "test/other",
                                           chunk_tokens=chunk_tokens)
        self.assertEqual(elsewhere.restore(prompt), (None, 0))
        self.assertEqual(cache.restore(prompt[:, :chunk_tokens]), (None, 0))
        # The CPU path restores the same KV.
        on_cpu, tokens = cache.restore(prompt, device="cpu")
        on_gpu, _ = cache.restore(prompt)
        self.assertEqual(tokens, prefix)
        for (k, v, *_), (gk, gv, *_) in zip(on_cpu, on_gpu):
            self.assertTrue(torch.equal(k, gk.cpu()))
            self.assertTrue(torch.equal(v, gv.cpu()))

    def test_small_llama_float16(self):
        model = make_model(torch.float16, vocab_size=4096, hidden_size=512,
                           intermediate_size=1024, num_hidden_layers=6,
                           num_attention_heads=8, num_key_value_heads=2)
        self.check_model("small-llama", model, prompt_tokens=1000,
                         chunk_tokens=128,
                         levels=["lossless", "near-lossless", "default"])

    def test_llama3_8b_shaped_bfloat16(self):
        model = make_model(torch.bfloat16, vocab_size=128256,
                           hidden_size=4096, intermediate_size=14336,
                           num_hidden_layers=2, num_attention_heads=32,
                           num_key_value_heads=8, rope_theta=500000.0)
        self.check_model("llama3-8b-shaped", model, prompt_tokens=4100,
                         chunk_tokens=256,
                         levels=["lossless", "near-lossless", "default"])

    def test_cpu_save_matches_gpu_save(self):
        model = make_model(torch.float16, vocab_size=512, hidden_size=256,
                           intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)
        prompt = torch.randint(3, 512, (1, 300), device="cuda")
        with torch.no_grad():
            computed = model(prompt, use_cache=True).past_key_values
        on_cpu = DynamicCache([(k.cpu(), v.cpu()) for k, v, *_ in computed])
        gpu = kvcache.hf.PrefixCache(self.client, model, "test/cpu-gpu",
                                     chunk_tokens=128, name_space="gpu")
        cpu = kvcache.hf.PrefixCache(self.client, model, "test/cpu-gpu",
                                     chunk_tokens=128, name_space="cpu")
        self.assertEqual(gpu.save(prompt, computed)["chunks"], 2)
        self.assertEqual(cpu.save(prompt.cpu(), on_cpu)["chunks"], 2)
        # Both stored the same lossless streams.
        self.assertEqual(self.client.get(gpu.keys(prompt)),
                         self.client.get(cpu.keys(prompt)))


if __name__ == "__main__":
    unittest.main()
