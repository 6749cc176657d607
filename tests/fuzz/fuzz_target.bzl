"""What a libFuzzer target is built from, for tests/fuzz/fuzz_lib.sh.

Bazel's toolchain here is gcc, which has no libFuzzer, so fuzz targets are
compiled by clang outside Bazel. `fuzz_target` walks the cc_library targets a
fuzzer links and writes a manifest of their sources, prebuilt objects (CUDA
host code from nvcc), defines, include directories and link flags; its
runfiles carry those sources, headers and generated files. A test that depends
on it reruns when any of them changes, and a new dependency of a fuzzed
library is picked up without editing any list.
"""

_FuzzSourcesInfo = provider(
    doc = "Transitive inputs of a fuzzer's libraries.",
    fields = ["files", "lines"],
)

def _manifest_lines(ctx):
    """The manifest lines of one cc_library (see fuzz_lib.sh)."""
    lines = []
    for f in getattr(ctx.rule.files, "srcs", []):
        if f.short_path.startswith("../"):
            continue  # an external repository: headers only, in /usr
        if f.extension in ["cc", "cpp"]:
            lines.append("src " + f.short_path)
        elif f.extension == "o":
            lines.append("obj " + f.short_path)
    attr = ctx.rule.attr
    for d in getattr(attr, "defines", []) + getattr(attr, "local_defines", []):
        lines.append("define " + d)
    if ctx.label.workspace_root == "":
        for inc in getattr(attr, "includes", []):
            lines.append("include " + ctx.label.package + "/" + inc)
    for opt in getattr(attr, "linkopts", []):
        lines.append("link " + opt)
    return lines

def _fuzz_sources_aspect_impl(target, ctx):
    files = []
    for name in ["srcs", "hdrs", "textual_hdrs"]:
        files += getattr(ctx.rule.files, name, [])
    deps = [d[_FuzzSourcesInfo] for d in getattr(ctx.rule.attr, "deps", []) if _FuzzSourcesInfo in d]
    return [_FuzzSourcesInfo(
        files = depset(files, transitive = [d.files for d in deps]),
        lines = depset(_manifest_lines(ctx), transitive = [d.lines for d in deps]),
    )]

_fuzz_sources_aspect = aspect(
    implementation = _fuzz_sources_aspect_impl,
    attr_aspects = ["deps"],
)

def _fuzz_target_impl(ctx):
    infos = [d[_FuzzSourcesInfo] for d in ctx.attr.deps]
    lines = depset(transitive = [i.lines for i in infos]).to_list()
    fuzzer = ctx.file.fuzzer
    manifest = ctx.actions.declare_file(ctx.label.name + ".manifest")
    ctx.actions.write(
        manifest,
        "\n".join(["fuzzer " + fuzzer.short_path] + lines +
                  ["max_len %d" % ctx.attr.max_len]) + "\n",
    )
    files = depset([fuzzer, manifest] + ctx.files.seeds, transitive = [i.files for i in infos])
    return [DefaultInfo(
        files = depset([manifest]),
        runfiles = ctx.runfiles(transitive_files = files),
    )]

fuzz_target = rule(
    implementation = _fuzz_target_impl,
    doc = "A libFuzzer target: its manifest `<name>.manifest` and inputs.",
    attrs = {
        "fuzzer": attr.label(
            allow_single_file = [".cc"],
            mandatory = True,
            doc = "The source defining LLVMFuzzerTestOneInput.",
        ),
        "deps": attr.label_list(
            aspects = [_fuzz_sources_aspect],
            doc = "cc_library targets the fuzzer links, with their deps.",
        ),
        "seeds": attr.label_list(
            allow_files = True,
            doc = "The seed corpus, tests/fuzz/corpus/<name>/.",
        ),
        "max_len": attr.int(
            default = 4096,
            doc = "libFuzzer's -max_len: the largest input it builds.",
        ),
    },
)
