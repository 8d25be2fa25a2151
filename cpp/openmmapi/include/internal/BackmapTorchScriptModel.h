#ifndef BACKMAP_TORCHSCRIPT_MODEL_H_
#define BACKMAP_TORCHSCRIPT_MODEL_H_

#include "internal/BackmapEnergyModel.h"
#include "internal/BackmapGlobalParameters.h"
#include <torch/script.h>
#include <string>
#include <vector>

namespace BackmapPlugin {

/**
 * A TorchScript module as a BackmapEnergyModel: forward(positions[, box][, p_1, ..., p_m]) gives
 * the energy, and autograd gives the forces and dE/dp.  Inputs have the dtype of the module's
 * first floating-point parameter or buffer (float64 if it has none).
 */
class OPENMM_EXPORT_BACKMAP BackmapTorchScriptModel : public BackmapEnergyModel {
public:
    /**
     * Load the module from the bytes of a .pt file and check that forward() takes the arguments
     * the force passes (positions, box vectors when periodic, one per global parameter).
     */
    BackmapTorchScriptModel(const std::string& bytes, const BackmapTorchForce& force);
    c10::TensorOptions getInputOptions() const;
    void moveTo(const c10::Device& device);
    BackmapEvaluation evaluate(const at::Tensor& positions, const at::Tensor& box, const std::vector<double>& parameters,
                               bool includeForces);
    /**
     * Load a TorchScript module from its serialized bytes, with an error that says what went wrong.
     */
    static torch::jit::script::Module loadModule(const std::string& bytes);
    /**
     * The dtype a module's inputs are given in: that of its first floating-point parameter or
     * buffer, float64 when it has none (an analytic model), so a float32 network is not silently
     * promoted and a float64 one keeps full precision.
     */
    static torch::Dtype moduleDtype(const torch::jit::script::Module& module);
private:
    torch::Tensor runForward();
    torch::jit::script::Module module;
    c10::TensorOptions options;
    BackmapGlobalParameters parameters;
    std::vector<torch::jit::IValue> inputs;
    torch::Tensor minusOne;
};

} // namespace BackmapPlugin

#endif /*BACKMAP_TORCHSCRIPT_MODEL_H_*/
