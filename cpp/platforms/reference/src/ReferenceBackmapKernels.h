#ifndef REFERENCE_BACKMAP_KERNELS_H_
#define REFERENCE_BACKMAP_KERNELS_H_

#include "BackmapKernels.h"
#include "internal/BackmapGlobalParameters.h"
#include "openmm/Platform.h"
#include <memory>
#include <string>

namespace BackmapPlugin {

/**
 * Evaluates a BackmapTorchForce on the Reference and CPU platforms (both keep positions and
 * forces in ReferencePlatform::PlatformData as double-precision Vec3 arrays).
 */
class ReferenceCalcBackmapTorchForceKernel : public CalcBackmapTorchForceKernel {
public:
    ReferenceCalcBackmapTorchForceKernel(std::string name, const OpenMM::Platform& platform) : CalcBackmapTorchForceKernel(name, platform) {
    }
    void initialize(const OpenMM::System& system, const BackmapTorchForce& force, std::shared_ptr<BackmapEnergyModel> model);
    double execute(OpenMM::ContextImpl& context, bool includeForces, bool includeEnergy);
private:
    std::shared_ptr<BackmapEnergyModel> model;
    c10::TensorOptions options;
    BackmapGlobalParameters parameters;
    bool periodic;
};

} // namespace BackmapPlugin

#endif
