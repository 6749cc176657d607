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
