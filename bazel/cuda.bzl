"""CUDA sources compiled by the toolkit's nvcc into a cc_library.

No CUDA rules can be fetched offline, so each .cu file becomes an object via
a genrule running /usr/local/cuda/bin/nvcc, and a cc_library links the objects
with the CUDA runtime. Code is built for Hopper (sm_90: H100, H200).
"""

CUDA_HOME = "/usr/local/cuda"
CUDA_ARCH_FLAGS = "-gencode=arch=compute_90,code=sm_90"

def cuda_library(
        name,
        srcs,
        hdrs = [],
        deps = [],
        nvcc_flags = [],
        nvcc_inputs = [],
        alwayslink = False,
        testonly = False):
    """A cc_library whose .cu sources are compiled by nvcc.

    Args:
      name: the cc_library's name.
      srcs: .cu files.
      hdrs: headers the .cu files and dependents include.
      deps: cc_library targets needed to link (their headers must be on the
        default include path or under this repository).
      nvcc_flags: extra nvcc flags.
      nvcc_inputs: other files the .cu files include (headers of deps), so
        editing them recompiles.
      alwayslink: link every object even if nothing references it (test
        registrations, main).
      testonly: as for cc_library.
    """
    objs = []
    for src in srcs:
        obj = src.replace(".cu", ".cu.o")
        native.genrule(
            name = name + "_" + src.replace("/", "_").replace(".", "_"),
            srcs = [src] + hdrs + nvcc_inputs,
            testonly = testonly,
            outs = [obj],
            cmd = " ".join([
                CUDA_HOME + "/bin/nvcc",
                "-std=c++17",
                "-O3",
                CUDA_ARCH_FLAGS,
                "-Xcompiler=-fPIC,-Wall",
                # Generated and source headers are both found from the roots.
                "-I.",
                "-I$(GENDIR)",
            ] + nvcc_flags + ["-c $(location " + src + ") -o $@"]),
        )
        objs.append(obj)
    native.cc_library(
        name = name,
        srcs = objs,
        hdrs = hdrs,
        includes = [],
        linkopts = [
            "-L" + CUDA_HOME + "/lib64",
            "-Wl,-rpath," + CUDA_HOME + "/lib64",
            "-lcudart",
        ],
        deps = deps,
        alwayslink = alwayslink,
        testonly = testonly,
    )
