"""C++ code generation for .proto files with the system protoc.

Bazel 4's native cc_proto_library needs @com_google_protobuf, which cannot be
fetched offline, so this runs Debian's protoc and grpc_cpp_plugin directly.
"""

def cc_grpc_proto_library(name, src, grpc = True, deps = []):
    """A cc_library over the C++ (and optionally gRPC) code for one .proto.

    Args:
      name: the cc_library's name.
      src: the .proto file, relative to this package; imports resolve from it.
      grpc: also generate the gRPC service stubs.
      deps: cc_grpc_proto_library targets of imported .proto files.
    """
    base = src[:-len(".proto")]
    outs = [base + ".pb.h", base + ".pb.cc"]
    pkg = native.package_name()
    flags = "--proto_path={pkg} --cpp_out=$(GENDIR)/{pkg}".format(pkg = pkg)
    if grpc:
        outs += [base + ".grpc.pb.h", base + ".grpc.pb.cc"]
        flags += " --grpc_out=$(GENDIR)/{pkg} --plugin=protoc-gen-grpc=$$(command -v grpc_cpp_plugin)".format(pkg = pkg)
    cmd = "protoc {flags} {pkg}/{src}".format(flags = flags, pkg = pkg, src = src)
    native.genrule(
        name = name + "_gen",
        srcs = [src],
        outs = outs,
        cmd = cmd,
    )
    native.cc_library(
        name = name,
        srcs = [o for o in outs if o.endswith(".cc")],
        hdrs = [o for o in outs if o.endswith(".h")],
        # Generated code includes its siblings as "kvcache/v1/x.pb.h".
        includes = ["."],
        copts = ["-Wno-unused-parameter"],
        deps = deps + ["@system//:grpc" if grpc else "@system//:protobuf"],
    )
