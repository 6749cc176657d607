#!/usr/bin/env bash
# Builds the kvcache wheel through its PEP 517 backend (pip wheel), installs
# it into a fresh virtual environment, and uses it there, from outside the
# source tree and with no library path set, against a real kvcached: the
# wheel alone must be enough.
set -euo pipefail
root=$PWD
work=${TEST_TMPDIR:-$(mktemp -d)}/wheel
rm -rf "$work" && mkdir -p "$work"

python3 -m venv "$work/venv"
KVCACHE_LIBRARY=$root/client/c/libkvcache.so "$work/venv/bin/pip" wheel \
  --quiet --disable-pip-version-check --no-build-isolation --no-deps \
  --no-index -w "$work/dist" "$root/client/python"
wheel=$(ls "$work"/dist/kvcache-*.whl)
echo "built $(basename "$wheel"): $(du -h "$wheel" | cut -f1)"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check --no-index \
  "$wheel"

cd "$work"
env -i PATH=/usr/bin:/bin KVCACHED="$root/kvstore/kvcached" \
  "$work/venv/bin/python" - <<'PY'
import os
import subprocess
import tempfile
import time

import kvcache

venv = os.path.dirname(os.path.dirname(os.path.abspath(
    os.path.realpath(__import__("sys").executable))))
assert kvcache.__file__.startswith(os.path.join(os.getcwd(), "venv")), \
    kvcache.__file__
# Every library libkvcache.so needs beyond the host's came from the wheel.
with open("/proc/self/maps") as f:
    loaded = {line.split()[-1] for line in f if ".so" in line}
lib_dir = os.path.join(os.path.dirname(kvcache.__file__), "_lib")
for name in ["libkvcache.so", "libgrpc++.so", "libprotobuf.so",
             "libabsl_status.so", "libcudart.so"]:
    found = [p for p in loaded if os.path.basename(p).startswith(name)]
    assert found and all(p.startswith(lib_dir) for p in found), (name, found)

port_file = tempfile.mktemp()
daemon = subprocess.Popen([os.environ["KVCACHED"], "--listen=127.0.0.1:0",
                           f"--port_file={port_file}"])
try:
    deadline = time.time() + 30
    while not (os.path.exists(port_file) and open(port_file).read().strip()):
        assert time.time() < deadline and daemon.poll() is None
        time.sleep(0.05)
    address = "127.0.0.1:" + open(port_file).read().strip()
    with kvcache.Client(address) as client:
        keys = kvcache.chunk_keys(range(300), "wheel-test", chunk_tokens=128)
        chunks = [bytes([i]) * (1000 + i) for i in range(len(keys))]
        client.put(keys, chunks)
        assert client.lookup(keys)["prefix_chunks"] == 3
        assert client.get(keys) == chunks
        try:
            client.get(kvcache.chunk_keys([1], "absent", chunk_tokens=1))
            raise AssertionError("a missing chunk was found")
        except kvcache.NotFoundError:
            pass
    # This environment has no NumPy: the array calls say so.
    try:
        kvcache.decode(b"\0" * 64)
        raise AssertionError("decode ran without numpy")
    except ImportError as e:
        assert "numpy" in str(e)
    print("wheel: imported from", os.path.dirname(kvcache.__file__),
          "ABI", kvcache.ABI_VERSION, "- put, lookup, get ok")
finally:
    daemon.terminate()
    daemon.wait(timeout=30)
PY
