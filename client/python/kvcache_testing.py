"""What the kvcache module's tests share: a real kvcached on loopback, and
the real KV dumps."""

import glob
import json
import os
import subprocess
import tempfile
import time

import numpy as np

# The daemon binary: a runfiles path, or $KVCACHED on a GPU host.
DAEMON = os.environ.get("KVCACHED", "kvstore/kvcached")


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
    dirs = ([os.environ["KVCACHE_KVDATA"]] if "KVCACHE_KVDATA" in os.environ
            else ["../kvdata", "external/kvdata"])
    manifest_path = sorted(
        sum((glob.glob(os.path.join(d, "*.json")) for d in dirs), []))[0]
    with open(manifest_path) as f:
        manifest = json.load(f)
    kv = np.fromfile(
        os.path.join(os.path.dirname(manifest_path), manifest["kv_file"]),
        dtype="<f2")
    channels = manifest["kv_heads"] * manifest["head_dim"]
    return manifest, kv.reshape(manifest["layers"], 2, manifest["tokens"],
                                channels)


def numpy_profile(kv, manifest, theta=10000.0):
    """A model profile's bytes (codec/FORMAT.md, "Model profiles") written
    here from the spec with NumPy: per layer, K/V and KV head, the mean and
    the eigenvectors of the covariance of the head's channels, keys with
    RoPE (adjacent pairs, base `theta`, as llama2.c applies it) undone."""
    layers, heads, dim = (manifest["layers"], manifest["kv_heads"],
                          manifest["head_dim"])
    tokens = kv.shape[2]
    x = kv.astype(np.float64).reshape(layers, 2, tokens, heads, dim)
    freq = theta ** (-2.0 * np.arange(dim // 2) / dim)
    angle = np.arange(tokens)[:, None] * freq[None, :]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    keys = x[:, 0].copy()
    a, b = x[:, 0, ..., 0::2], x[:, 0, ..., 1::2]
    keys[..., 0::2] = a * cos + b * sin
    keys[..., 1::2] = b * cos - a * sin
    x[:, 0] = keys
    means, bases, variances = [], [], []
    for layer in range(layers):
        for kv_index in range(2):
            for head in range(heads):
                samples = x[layer, kv_index, :, head, :]
                values, vectors = np.linalg.eigh(np.cov(samples.T,
                                                        bias=True))
                order = np.argsort(values)[::-1]
                means.append(samples.mean(axis=0))
                bases.append(vectors[:, order].T)
                variances.append(np.maximum(values[order], 0))
    variances = np.minimum.accumulate(np.array(variances), axis=1)
    return (b"KVCP" + bytes([1, 1, 0, 0]) +
            np.array([layers, heads, dim], "<u4").tobytes() +
            freq.astype("<f8").tobytes() +
            np.array(means, "<f4").tobytes() +
            np.array(bases, "<f4").tobytes() +
            variances.astype("<f4").tobytes())
