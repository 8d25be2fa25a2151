#ifndef BACKMAP_TORCH_UTILITIES_H_
#define BACKMAP_TORCH_UTILITIES_H_

#include "openmm/OpenMMException.h"
#include <torch/script.h>
#include <string>
#include <vector>

namespace BackmapPlugin {

/**
 * The dtype the module's inputs are given in: that of its first floating-point parameter or
 * buffer, float64 when it has none (an analytic model), so a float32 network is not silently
 * promoted and a float64 one keeps full precision.
 */
inline torch::Dtype backmapModuleDtype(const torch::jit::script::Module& module) {
    for (const at::Tensor& p : module.parameters(true))
        if (p.is_floating_point())
            return p.scalar_type();
    for (const at::Tensor& b : module.buffers(true))
        if (b.is_floating_point())
            return b.scalar_type();
    return torch::kFloat64;
}

/**
 * Run forward() and check that the result is a tensor with one element; errors from the
 * interpreter are rethrown as OpenMMException so Python sees the message.
 */
inline torch::Tensor backmapRunForward(torch::jit::script::Module& module, std::vector<torch::jit::IValue>& inputs) {
    torch::jit::IValue result;
    try {
        result = module.forward(inputs);
    }
    catch (const std::exception& e) {
        throw OpenMM::OpenMMException(std::string("BackmapTorchForce: forward() failed: ") + e.what());
    }
    if (!result.isTensor())
        throw OpenMM::OpenMMException("BackmapTorchForce: forward() must return the energy as a tensor");
    torch::Tensor energy = result.toTensor();
    if (energy.numel() != 1)
        throw OpenMM::OpenMMException("BackmapTorchForce: forward() must return one energy value, got a tensor with "
                + std::to_string(energy.numel()) + " elements");
    return energy.reshape({});
}

} // namespace BackmapPlugin

#endif
