#ifndef CUDA_BACKMAP_KERNELS_H_
#define CUDA_BACKMAP_KERNELS_H_

#include "BackmapKernels.h"
#include "internal/BackmapGlobalParameters.h"
#include "openmm/cuda/CudaContext.h"
#include "openmm/cuda/CudaArray.h"
#include <memory>
#include <string>

namespace BackmapPlugin {

/**
 * Evaluates a BackmapTorchForce on the CUDA platform.  Positions go from OpenMM's posq array into
 * a torch tensor on the same device, and the model's forces go back into OpenMM's fixed-point
 * force buffer, both with device-to-device kernels queued on OpenMM's current stream; torch runs on
 * that same stream, so no host synchronisation is needed unless the energy is requested.
 */
class CudaCalcBackmapTorchForceKernel : public CalcBackmapTorchForceKernel {
public:
    CudaCalcBackmapTorchForceKernel(std::string name, const OpenMM::Platform& platform, OpenMM::CudaContext& cu) :
            CalcBackmapTorchForceKernel(name, platform), cu(cu) {
    }
    void initialize(const OpenMM::System& system, const BackmapTorchForce& force, std::shared_ptr<BackmapEnergyModel> model);
    double execute(OpenMM::ContextImpl& context, bool includeForces, bool includeEnergy);
private:
    OpenMM::CudaContext& cu;
    std::shared_ptr<BackmapEnergyModel> model;
    c10::TensorOptions options;
    at::ScalarType dtype;
    BackmapGlobalParameters parameters;
    bool periodic;
    at::Tensor positionBuffer;
    CUfunction copyInputsKernel, addForcesKernel;
};

} // namespace BackmapPlugin

#endif
