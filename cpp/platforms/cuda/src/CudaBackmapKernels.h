#ifndef CUDA_BACKMAP_KERNELS_H_
#define CUDA_BACKMAP_KERNELS_H_

#include "BackmapKernels.h"
#include "openmm/cuda/CudaContext.h"
#include "openmm/cuda/CudaArray.h"
#include <string>
#include <vector>

namespace BackmapPlugin {

/**
 * Evaluates a BackmapTorchForce on the CUDA platform.  Positions go from OpenMM's posq array into
 * a torch tensor on the same device, and the autograd gradient goes back into OpenMM's fixed-point
 * force buffer, both with device-to-device kernels queued on OpenMM's current stream; torch runs on
 * that same stream, so no host synchronisation is needed unless the energy is requested.
 */
class CudaCalcBackmapTorchForceKernel : public CalcBackmapTorchForceKernel {
public:
    CudaCalcBackmapTorchForceKernel(std::string name, const OpenMM::Platform& platform, OpenMM::CudaContext& cu) :
            CalcBackmapTorchForceKernel(name, platform), cu(cu) {
    }
    void initialize(const OpenMM::System& system, const BackmapTorchForce& force, torch::jit::script::Module& module,
                    std::shared_ptr<BackmapCompiledModel> compiled);
    double execute(OpenMM::ContextImpl& context, bool includeForces, bool includeEnergy);
private:
    OpenMM::CudaContext& cu;
    torch::jit::script::Module module;
    torch::Dtype dtype;
    torch::Device device = torch::Device(torch::kCUDA, 0);
    bool periodic;
    std::vector<std::string> globalNames;
    std::vector<bool> globalNeedsDerivative;
    std::vector<torch::jit::IValue> inputs;
    torch::Tensor positionBuffer;
    CUfunction copyInputsKernel, addForcesKernel;
};

} // namespace BackmapPlugin

#endif
