#include "CudaBackmapKernels.h"
#include "internal/windowsExportBackmap.h"
#include "openmm/KernelFactory.h"
#include "openmm/cuda/CudaPlatform.h"
#include "openmm/OpenMMException.h"
#include "openmm/internal/ContextImpl.h"

namespace BackmapPlugin {

/**
 * Creates the plugin's kernels for the CUDA platform.
 */
class CudaBackmapKernelFactory : public OpenMM::KernelFactory {
public:
    OpenMM::KernelImpl* createKernelImpl(std::string name, const OpenMM::Platform& platform, OpenMM::ContextImpl& context) const {
        OpenMM::CudaContext& cu = *static_cast<OpenMM::CudaPlatform::PlatformData*>(context.getPlatformData())->contexts[0];
        if (name == CalcBackmapTorchForceKernel::Name())
            return new CudaCalcBackmapTorchForceKernel(name, platform, cu);
        throw OpenMM::OpenMMException("Tried to create kernel with illegal kernel name '" + name + "'");
    }
};

} // namespace BackmapPlugin

using namespace BackmapPlugin;
using namespace OpenMM;

extern "C" OPENMM_EXPORT_BACKMAP void registerPlatforms() {
}

extern "C" OPENMM_EXPORT_BACKMAP void registerKernelFactories() {
    try {
        Platform& platform = Platform::getPlatformByName("CUDA");
        if (!platform.supportsKernels({CalcBackmapTorchForceKernel::Name()}))
            platform.registerKernelFactory(CalcBackmapTorchForceKernel::Name(), new CudaBackmapKernelFactory());
    }
    catch (std::exception& ex) {
        // The CUDA platform is not available; nothing to register.
    }
}

extern "C" OPENMM_EXPORT_BACKMAP void registerBackmapCudaKernelFactories() {
    registerKernelFactories();
}
