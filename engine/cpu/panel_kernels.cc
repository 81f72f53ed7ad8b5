#include "engine/cpu/panel_kernels.h"

namespace moe {

const PanelKernels& PanelKernelsFor(CpuPath path) {
#if defined(__x86_64__)
  if (path == CpuPath::kAvx512) return Avx512PanelKernels();
  if (path == CpuPath::kAvx2) return Avx2PanelKernels();
#endif
  return PortablePanelKernels();
}

}  // namespace moe
