"""Compile kernel sources with NVRTC through ctypes, without a GPU.

libnvrtc comes from the ``nvidia-cuda-nvrtc`` wheel (the test extra). Used by
test_cuda_nvrtc.py to compile every .cu exactly as CuPy's RawModule would.
"""
import ctypes
import glob
import importlib.util
import os



def find_libnvrtc():
    """Path of libnvrtc.so from the nvidia-cuda-nvrtc wheel, or None."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        hits = sorted(glob.glob(os.path.join(root, "**", "lib", "libnvrtc.so*"), recursive=True))
        hits = [h for h in hits if "builtins" not in os.path.basename(h)]
        if hits:
            return hits[0]
    return None


class NVRTCError(RuntimeError):
    pass


class NVRTC:
    def __init__(self, path):
        self.lib = ctypes.CDLL(path)
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p

    def version(self):
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)))
        return major.value, minor.value

    def _check(self, status, log=""):
        if status != 0:
            msg = self.lib.nvrtcGetErrorString(status).decode()
            raise NVRTCError(f"{msg}\n{log}")

    def compile(self, source, name, options, name_expressions):
        """Compile; returns (ptx, {name expression: lowered (mangled) name}, log)."""
        prog = ctypes.c_void_p()
        self._check(self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(),
                                                name.encode(), 0, None, None))
        try:
            for expr in name_expressions:
                self._check(self.lib.nvrtcAddNameExpression(prog, expr.encode()))
            opts = [o.encode() for o in options]
            arr = (ctypes.c_char_p * len(opts))(*opts)
            status = self.lib.nvrtcCompileProgram(prog, len(opts), arr)
            size = ctypes.c_size_t()
            self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            self.lib.nvrtcGetProgramLog(prog, buf)
            log = buf.value.decode(errors="replace")
            self._check(status, log)
            lowered = {}
            for expr in name_expressions:
                out = ctypes.c_char_p()
                self._check(self.lib.nvrtcGetLoweredName(prog, expr.encode(), ctypes.byref(out)))
                lowered[expr] = out.value.decode()
            self.lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
            ptx = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetPTX(prog, ptx))
            return ptx.value.decode(), lowered, log
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))
