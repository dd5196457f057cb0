"""Builds the two compiled parts of gpudiff with pybind11.

gpudiff._C          the CPU hot loops (csrc/cpu/*.cpp), OpenMP across cores, GIL released.
gpudiff._cuda_host  the CUDA kernels of csrc/cuda/*.cu compiled for the CPU emulator
                    (csrc/cuda_host/), so CI executes the same kernel source a GPU runs.

The .cu sources are also copied into the package (gpudiff/_cuda_src) so that CuPy's NVRTC
can compile them at run time on a real GPU.
"""
import glob
import os
import re
import shutil

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _copy_cuda_sources():
    # package data for NVRTC at run time: one source for GPU and emulator
    dst = os.path.join(HERE, "gpudiff", "_cuda_src")
    os.makedirs(dst, exist_ok=True)
    for f in glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu*")):
        shutil.copy2(f, dst)


_copy_cuda_sources()

# ---- gpudiff._C: CPU kernels ----------------------------------------------------------
cpu_ext = Pybind11Extension(
    "gpudiff._C",
    sorted(glob.glob("csrc/cpu/*.cpp")),
    include_dirs=["csrc/cpu"],
    depends=sorted(glob.glob("csrc/cpu/*.h")),   # a changed header rebuilds the sources
    cxx_std=17,
    extra_compile_args=["-O3", "-fopenmp", "-ffast-math", "-fno-finite-math-only"],
    extra_link_args=["-fopenmp"],
)

# ---- gpudiff._cuda_host: CUDA kernels on the CPU emulator -----------------------------
cuda_host_ext = Pybind11Extension(
    "gpudiff._cuda_host",
    sorted(glob.glob("csrc/cuda_host/*.cpp")),
    include_dirs=["csrc/cuda_host", "csrc/cuda"],
    cxx_std=17,
    extra_compile_args=["-O2"],
    depends=sorted(glob.glob("csrc/cuda/*") + glob.glob("csrc/cuda_host/*.h")),
)

exts = [e for e in (cpu_ext, cuda_host_ext) if e.sources]

# The kernel translation units of the emulator (csrc/cuda_host/kernels_*.cpp) get GCC's
# ThreadSanitizer instrumentation without its run-time library: every load and store of a
# kernel calls a __tsan_* hook, which csrc/cuda_host/sanitizer.cpp defines (bounds checks,
# racecheck, initcheck; docs/EMULATOR.md). Only those files: the scheduler must not be.
KERNEL_TU_FLAGS = ["-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0"]


# `extern __shared__ T name[];` (dynamic shared memory as an unsized extern array, the idiom
# of cuda-samples) cannot be given a meaning by the shim's macros: the declaration has no size
# and the shim's `__shared__` makes a variable static. So for the emulator build only, a .cu
# file that has such declarations inside functions is compiled from a copy in the build
# directory (found first on the include path, `#line` keeps the real file name and line
# numbers) in which each one reads `T* const name = dynamic_shared<T>();`: every extern
# shared array of a kernel is the launch's dynamic shared memory, as on a GPU, with its
# checks (bounds, guard zones, poison per block, initcheck, racecheck). NVRTC and nvcc
# compile the .cu unchanged. docs/EMULATOR.md.
EXTERN_SHARED = re.compile(
    r"\bextern\s+__shared__\s+(?P<decl>[^;{}\[\]=\"']*?)\s*\b(?P<name>[A-Za-z_]\w*)\s*\[\s*\]\s*;")
ALIGN_SPEC = re.compile(r"__align__\s*\(\s*\w+\s*\)|__attribute__\s*\(\(.*?\)\)")


def _blank_comments_and_literals(src):
    # same length and line breaks: positions in the result are positions in src
    def blank(m):
        t = m.group(0)
        if t[0] in "\"'":
            return t[0] + re.sub(r"[^\n]", " ", t[1:-1]) + t[-1]
        return re.sub(r"[^\n]", " ", t)
    return re.sub(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', blank, src,
                  flags=re.S)


def _in_function(code, pos):
    # the innermost unclosed brace before pos opens a function body (or a block in one),
    # not a namespace or an extern "C" block
    depth, i = 0, pos
    while i > 0:
        i -= 1
        if code[i] == "}":
            depth += 1
        elif code[i] == "{":
            if depth == 0:
                head = code[max(0, i - 200):i]
                return not re.search(r'(\bnamespace\b[\s\w:]*|\bextern\s*"\s*C\s*")\s*$', head)
            depth -= 1
    return False


def rewrite_extern_shared(path):
    """The emulator's version of .cu file `path`, or None when it has no extern __shared__."""
    src = open(path).read()
    code = _blank_comments_and_literals(src)
    out, last = [], 0
    for m in EXTERN_SHARED.finditer(code):
        name = m.group("name")
        if not _in_function(code, m.start()):
            line = code.count("\n", 0, m.start()) + 1
            raise RuntimeError(f"{path}:{line}: the emulator supports `extern __shared__ T "
                               f"{name}[];` only inside a function (a kernel or device function)")
        ctype = " ".join(ALIGN_SPEC.sub(" ", src[m.start("decl"):m.end("decl")]).split())
        if not ctype:
            continue
        text = src[m.start():m.end()]  # keep the line count: pad with the newlines it spanned
        out += [src[last:m.start()],
                f"{ctype}* const {name} = dynamic_shared<{ctype}>();" + "\n" * text.count("\n")]
        last = m.end()
    if not out:
        return None
    return f'#line 1 "{os.path.abspath(path)}"\n' + "".join(out) + src[last:]


def _emulator_sources(gen_dir):
    # write (only when changed) the rewritten copies; drop stale ones, which would shadow
    os.makedirs(gen_dir, exist_ok=True)
    wanted = {}
    for f in sorted(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu"))):
        text = rewrite_extern_shared(f)
        if text is not None:
            wanted[os.path.basename(f)] = text
    for f in os.listdir(gen_dir):
        if f not in wanted:
            os.remove(os.path.join(gen_dir, f))
    for name, text in wanted.items():
        dst = os.path.join(gen_dir, name)
        if not os.path.exists(dst) or open(dst).read() != text:
            with open(dst, "w") as fh:
                fh.write(text)


class BuildExt(build_ext):
    def build_extensions(self):
        gen_dir = os.path.abspath(os.path.join(self.build_temp, "cuda_host_src"))
        _emulator_sources(gen_dir)
        for ext in self.extensions:
            if ext.name == "gpudiff._cuda_host":
                ext.include_dirs = [gen_dir] + [d for d in ext.include_dirs if d != gen_dir]
        compile_one = self.compiler._compile

        def _compile(obj, src, ext, cc_args, extra_postargs, pp_opts):
            if os.path.basename(src).startswith("kernels_") and "cuda_host" in src:
                extra_postargs = list(extra_postargs) + KERNEL_TU_FLAGS
            compile_one(obj, src, ext, cc_args, extra_postargs, pp_opts)

        self.compiler._compile = _compile
        super().build_extensions()


setup(ext_modules=exts, cmdclass={"build_ext": BuildExt})
