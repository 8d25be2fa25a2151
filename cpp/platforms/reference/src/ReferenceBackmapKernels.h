#ifndef REFERENCE_BACKMAP_KERNELS_H_
#define REFERENCE_BACKMAP_KERNELS_H_

#include "BackmapKernels.h"
#include "openmm/Platform.h"
#include <string>
#include <vector>

namespace BackmapPlugin {

/**
 * Evaluates a BackmapTorchForce on the Reference and CPU platforms (both keep positions and
 * forces in ReferencePlatform::PlatformData as double-precision Vec3 arrays).
 */
class ReferenceCalcBackmapTorchForceKernel : public CalcBackmapTorchForceKernel {
public:
    ReferenceCalcBackmapTorchForceKernel(std::string name, const OpenMM::Platform& platform) : CalcBackmapTorchForceKernel(name, platform) {
    }
    void initialize(const OpenMM::System& system, const BackmapTorchForce& force, torch::jit::script::Module& module,
                    std::shared_ptr<BackmapCompiledModel> compiled);
    double execute(OpenMM::ContextImpl& context, bool includeForces, bool includeEnergy);
private:
    double executeCompiled(OpenMM::ContextImpl& context, bool includeForces, bool includeEnergy);
    std::shared_ptr<BackmapCompiledModel> compiled;
    std::vector<at::Tensor> compiledInputs;
    torch::jit::script::Module module;
    torch::Dtype dtype;
    bool periodic;
    std::vector<std::string> globalNames;
    std::vector<bool> globalNeedsDerivative;
    std::vector<torch::jit::IValue> inputs;
};

} // namespace BackmapPlugin

#endif
