// gpudiff._cuda_host: the CPU emulator of our CUDA kernels, as seen from Python.
// gpudiff/backend/cuda_launch.py is its only caller.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <string>

#include "emulator.h"
#include "sanitizer.h"

namespace py = pybind11;

namespace {

// A kernel argument: a C-contiguous NumPy array (passed as a pointer) or a NumPy scalar
// (passed by value). Python ints/floats are refused: their width on the GPU is a guess.
gd_host::Arg to_arg(py::handle o, size_t i) {
    gd_host::Arg a;
    const auto np_generic = py::module_::import("numpy").attr("generic");
    if (py::isinstance<py::array>(o)) {
        auto arr = py::reinterpret_borrow<py::array>(o);
        if (arr.size() > 0 && !(arr.flags() & py::array::c_style))
            throw py::value_error("argument " + std::to_string(i) +
                                  ": arrays must be C-contiguous (a kernel sees a bare pointer)");
        a.is_array = true;
        a.data = const_cast<void*>(arr.data());
        a.nbytes = static_cast<size_t>(arr.nbytes());
        a.writable = arr.writeable();
        a.dtype = std::string(1, arr.dtype().kind()) + std::to_string(arr.itemsize());
    } else if (py::isinstance(o, np_generic)) {
        py::array arr = py::array::ensure(o);
        if (arr.itemsize() > 8)
            throw py::value_error("argument " + std::to_string(i) + ": scalar wider than 8 bytes");
        a.dtype = std::string(1, arr.dtype().kind()) + std::to_string(arr.itemsize());
        std::memcpy(a.scalar, arr.data(), static_cast<size_t>(arr.itemsize()));
    } else {
        throw py::type_error("argument " + std::to_string(i) + " (" +
                             std::string(py::str(py::type::handle_of(o).attr("__name__"))) +
                             "): pass a NumPy array or a typed NumPy scalar such as "
                             "np.int32(n) or np.float32(x)");
    }
    return a;
}

dim3 to_dim3(const std::vector<unsigned>& v) {
    if (v.size() != 3) throw py::value_error("grid and block must be 3-tuples");
    return dim3(v[0], v[1], v[2]);
}

py::dict launch(const std::string& name, const std::vector<unsigned>& grid,
                const std::vector<unsigned>& block, size_t shared_mem, py::sequence args,
                const std::string& order, unsigned long long seed, bool shuffle_blocks, bool race,
                bool init) {
    std::vector<gd_host::Arg> converted;
    for (size_t i = 0; i < args.size(); ++i) converted.push_back(to_arg(args[i], i));
    gd_host::LaunchOptions opt;
    if (order == "forward") opt.order = gd_host::ThreadOrder::Forward;
    else if (order == "reverse") opt.order = gd_host::ThreadOrder::Reverse;
    else if (order == "random") opt.order = gd_host::ThreadOrder::Random;
    else throw py::value_error("order must be 'forward', 'reverse' or 'random', got '" + order + "'");
    opt.seed = seed;
    opt.shuffle_blocks = shuffle_blocks;
    opt.race = race;
    opt.init = init;
    gd_host::LaunchStats st;
    {
        py::gil_scoped_release nogil;  // launches are serialised inside by a mutex
        st = gd_host::launch(name, to_dim3(grid), to_dim3(block), shared_mem, std::move(converted),
                             opt);
    }
    py::dict d;
    d["blocks"] = st.blocks;
    d["threads"] = st.threads;
    d["resumes"] = st.resumes;
    return d;
}

}  // namespace

PYBIND11_MODULE(_cuda_host, m) {
    m.doc() = "CPU emulator for gpudiff's CUDA kernels (see docs/EMULATOR.md)";
    py::register_exception<gd_host::KernelError>(m, "KernelError", PyExc_RuntimeError);
    m.def("launch", &launch, py::arg("name"), py::arg("grid"), py::arg("block"),
          py::arg("shared_mem"), py::arg("args"), py::arg("order") = "forward",
          py::arg("seed") = 0, py::arg("shuffle_blocks") = false, py::arg("race") = false,
          py::arg("init") = false,
          "Run kernel `name` on the CPU; returns {'blocks', 'threads', 'resumes'}. race: "
          "racecheck, init: initcheck (docs/EMULATOR.md); bounds checks are always on.");
    m.def("kernel_names", &gd_host::kernel_names, "Name expressions of the compiled kernels.");
    m.def("shared_variables", &gd_host::san::shared_variables,
          "The static __shared__ variables the memory checker knows, 'name: bytes' lines.");
    m.def("set_mma_fault", &gd_host::set_mma_fault, py::arg("fault"),
          "Test hook: 0 the PTX ISA's mma fragment layouts; 1, 2, 3 a deliberately wrong one "
          "(A rows of groupID 0 and 1 swapped; B's k index misread; D's column pairs swapped).");
    m.def("mma_fault", &gd_host::mma_fault, "The mma fault set_mma_fault chose (0: none).");
    m.def("kernel_signature", &gd_host::kernel_signature,
          "Parameter types of a kernel, e.g. '(gptr<const f4>, gptr<f4>, i8)'.");
}
