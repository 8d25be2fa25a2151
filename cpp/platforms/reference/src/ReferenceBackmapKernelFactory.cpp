#include "ReferenceBackmapKernelFactory.h"
#include "ReferenceBackmapKernels.h"
#include "openmm/OpenMMException.h"
#include "openmm/internal/ContextImpl.h"
#include "openmm/reference/ReferencePlatform.h"

using namespace BackmapPlugin;
using namespace OpenMM;

extern "C" OPENMM_EXPORT_BACKMAP void registerPlatforms() {
}

extern "C" OPENMM_EXPORT_BACKMAP void registerKernelFactories() {
    registerBackmapReferenceKernelFactories();
}

extern "C" OPENMM_EXPORT_BACKMAP void registerBackmapReferenceKernelFactories() {
    std::vector<std::string> kernels = {CalcBackmapTorchForceKernel::Name()};
    for (int i = 0; i < Platform::getNumPlatforms(); i++) {
        Platform& platform = Platform::getPlatform(i);
        if (dynamic_cast<ReferencePlatform*>(&platform) != NULL && !platform.supportsKernels(kernels))
            platform.registerKernelFactory(CalcBackmapTorchForceKernel::Name(), new ReferenceBackmapKernelFactory());
    }
}

KernelImpl* ReferenceBackmapKernelFactory::createKernelImpl(std::string name, const Platform& platform, ContextImpl& context) const {
    if (name == CalcBackmapTorchForceKernel::Name())
        return new ReferenceCalcBackmapTorchForceKernel(name, platform);
    throw OpenMMException((std::string("Tried to create kernel with illegal kernel name '") + name + "'").c_str());
}
