"""PEP 517 backend of the kvcache package: `pip wheel client/python`.

The wheel holds the pure-Python package and, in kvcache/_lib/, libkvcache.so
with every shared library it needs that a Linux host with only glibc,
libstdc++ and the NVIDIA driver lacks (gRPC, Protobuf, Abseil, OpenSSL, the
CUDA runtime, ...), each made to find the others beside it ($ORIGIN). One
wheel serves every CPython from 3.9 on: the package loads the library with
ctypes and has no extension module.

The library comes from $KVCACHE_LIBRARY if set (a libkvcache.so already
built), else from `bazel build -c opt //client/c:libkvcache.so` in the
repository this directory belongs to. Bundling needs ldd and patchelf.
"""

import base64
import hashlib
import io
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import zipfile

NAME = "kvcache"
VERSION = "0.1.0"
TAG = "py3-none-linux_x86_64"
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPOSITORY = os.path.dirname(os.path.dirname(HERE))

# Libraries every host that can run the wheel has; everything else that
# libkvcache.so links travels in the wheel. libcuda comes with the driver.
HOST_LIBRARIES = re.compile(
    r"^(libc|libm|libdl|librt|libpthread|ld-linux-x86-64|libstdc\+\+|"
    r"libgcc_s|libcuda|libnccl|linux-vdso)\.so")


def _metadata():
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    return (f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {VERSION}\n"
            "Summary: Store and fetch LLM KV-cache chunks by prompt prefix "
            "(kvcache's client and codec)\n"
            "Requires-Python: >=3.9\n"
            "Provides-Extra: numpy\nRequires-Dist: numpy; extra == 'numpy'\n"
            "Description-Content-Type: text/markdown\n\n" + readme)


def _library():
    path = os.environ.get("KVCACHE_LIBRARY")
    if path:
        return path
    if not os.path.exists(os.path.join(REPOSITORY, "WORKSPACE")):
        raise RuntimeError(
            "set KVCACHE_LIBRARY to a built libkvcache.so: this source tree "
            "is not inside the kvcache repository, which could build it")
    subprocess.run(["bazel", "build", "-c", "opt", "//client/c:libkvcache.so"],
                   cwd=REPOSITORY, check=True)
    return os.path.join(REPOSITORY, "bazel-bin", "client", "c",
                        "libkvcache.so")


def _bundle(library, into):
    """Copies the library and the shared libraries it needs into `into`,
    each with RPATH $ORIGIN; returns their names."""
    os.makedirs(into)
    ldd = subprocess.run(["ldd", library], check=True, capture_output=True,
                         text=True).stdout
    names = ["libkvcache.so"]
    shutil.copyfile(library, os.path.join(into, "libkvcache.so"))
    for line in ldd.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == "=>" and parts[2].startswith("/"):
            if HOST_LIBRARIES.match(parts[0]):
                continue
            shutil.copyfile(parts[2], os.path.join(into, parts[0]))
            names.append(parts[0])
        elif "not found" in line:
            raise RuntimeError(f"{library} needs {parts[0]}, not found here")
    for name in names:
        path = os.path.join(into, name)
        os.chmod(path, 0o755)
        # Old-style RPATH, which the loader also uses for the libraries a
        # library loads, so each finds the others beside it.
        subprocess.run(["patchelf", "--force-rpath", "--set-rpath", "$ORIGIN",
                        path], check=True)
    return names


def _record_line(arcname, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest())
    return f"{arcname},sha256={digest.rstrip(b'=').decode()},{len(data)}"


def build_wheel(wheel_directory, config_settings=None,
                metadata_directory=None):
    del config_settings, metadata_directory
    wheel_name = f"{NAME}-{VERSION}-{TAG}.whl"
    dist_info = f"{NAME}-{VERSION}.dist-info"
    files = {}
    package = os.path.join(HERE, NAME)
    for name in sorted(os.listdir(package)):
        if name.endswith(".py"):
            with open(os.path.join(package, name), "rb") as f:
                files[f"{NAME}/{name}"] = f.read()
    with tempfile.TemporaryDirectory() as tmp:
        lib_dir = os.path.join(tmp, "_lib")
        for name in _bundle(_library(), lib_dir):
            with open(os.path.join(lib_dir, name), "rb") as f:
                files[f"{NAME}/_lib/{name}"] = f.read()
    files[f"{dist_info}/METADATA"] = _metadata().encode()
    files[f"{dist_info}/WHEEL"] = (
        "Wheel-Version: 1.0\nGenerator: kvcache_build\nRoot-Is-Purelib: "
        f"false\nTag: {TAG}\n").encode()
    record = [_record_line(n, d) for n, d in files.items()]
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = os.path.join(wheel_directory, wheel_name)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
            info.external_attr = (0o755 if name.endswith(".so") else
                                  0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            wheel.writestr(info, data)
    return wheel_name


def build_sdist(sdist_directory, config_settings=None):
    """The package's sources; a wheel built from them needs
    KVCACHE_LIBRARY."""
    del config_settings
    base = f"{NAME}-{VERSION}"
    path = os.path.join(sdist_directory, f"{base}.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        for relative in (["pyproject.toml", "README.md"] +
                         [f"build_backend/{n}" for n in
                          sorted(os.listdir(os.path.join(HERE,
                                                         "build_backend")))
                          if n.endswith(".py")] +
                         [f"{NAME}/{n}" for n in
                          sorted(os.listdir(os.path.join(HERE, NAME)))
                          if n.endswith(".py")]):
            tar.add(os.path.join(HERE, relative), f"{base}/{relative}")
        info = tarfile.TarInfo(f"{base}/PKG-INFO")
        data = _metadata().encode()
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return os.path.basename(path)
