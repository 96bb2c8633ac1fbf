// The Python module of the C++ CPU kernels. Importing it (ddo_fast/_library.py does, on the first
// CPU operator call; the AOT build's is `ddo_fast._C`) loads this library, whose static
// registrations add the CPU kernels of the `ddo_fast` operators (csrc/cpu/*.cpp) and the
// `ddo_fast_testing` operators. The operator schemas are defined from Python
// (ddo_fast/_library.py), so that `import ddo_fast` needs no compiled code. The module's
// functions report and (for tests) switch the instruction set of the kernels (csrc/cpu/isa/).
#include <Python.h>
#include <c10/util/Exception.h>

#include "cpu/isa/kernels.h"

// The module name: `_C` for the ahead-of-time build, a versioned name for the JIT build (its
// import function must be PyInit_<name>).
#ifndef DDO_FAST_MODULE_NAME
#define DDO_FAST_MODULE_NAME _C
#endif
#define DDO_FAST_STR2(x) #x
#define DDO_FAST_STR(x) DDO_FAST_STR2(x)
#define DDO_FAST_CAT2(a, b) a##b
#define DDO_FAST_CAT(a, b) DDO_FAST_CAT2(a, b)

namespace {

// cpu_isa() -> str: the ISA whose kernels run (selects it on first use; a bad
// $DDO_FAST_CPU_ISA raises ValueError, an unsupported one RuntimeError).
PyObject* cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(ddo_fast::cpu_kernels().isa);
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  }
  return nullptr;
}

// supported_cpu_isas() -> str: the ISAs this build has and this CPU supports, comma-separated.
PyObject* supported_cpu_isas(PyObject*, PyObject*) {
  return PyUnicode_FromString(ddo_fast::supported_isas());
}

// _set_cpu_isa(name) -> bool: test hook; switches the kernels of every later call.
PyObject* set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  return PyBool_FromLong(ddo_fast::set_cpu_isa(name));
}

PyMethodDef kMethods[] = {
    {"cpu_isa", &cpu_isa, METH_NOARGS, "The instruction set of the running CPU kernels."},
    {"supported_cpu_isas", &supported_cpu_isas, METH_NOARGS,
     "Comma-separated ISAs this build has and this CPU supports, best last."},
    {"_set_cpu_isa", &set_cpu_isa, METH_O, "Test hook: switch the CPU kernels' ISA."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
PyMODINIT_FUNC DDO_FAST_CAT(PyInit_, DDO_FAST_MODULE_NAME)(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, DDO_FAST_STR(DDO_FAST_MODULE_NAME), nullptr, -1, kMethods};
  return PyModule_Create(&module_def);
}
}
