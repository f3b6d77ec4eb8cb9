// The library's spare core (spare_core.h), for Python (ctypes: kernels/native.py). Linked
// into every library whose kernels use it, so each exports these under the same names,
// looked up in that library.

#include "spare_core.h"

// Items the helper finished (which 0) and items taken back from it (1) since the library
// was loaded.
extern "C" int64_t XlaInferenceSpareCoreItems(int which) {
  const xla_inference::SpareCore& core = xla_inference::SpareCore::get();
  return which == 0 ? core.items_by_helper() : core.items_taken_back();
}

// A pause in each item the helper takes (XLA_INFERENCE_SPARE_CORE_TESTING builds: tests).
extern "C" void XlaInferenceSpareCoreTestDelay(int64_t micros) {
  xla_inference::SpareCore::get().test_delay_micros.store(micros);
}

// envs.spare_core_enabled(), set when the library is loaded.
extern "C" void XlaInferenceUseSpareCore(int on) {
  xla_inference::spare_core_wanted.store(on != 0 && XLA_INFERENCE_SPARE_CORE != 0);
}
