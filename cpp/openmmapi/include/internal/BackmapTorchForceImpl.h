#ifndef BACKMAP_TORCH_FORCE_IMPL_H_
#define BACKMAP_TORCH_FORCE_IMPL_H_

#include "BackmapTorchForce.h"
#include "internal/BackmapCompiledModel.h"
#include "openmm/Kernel.h"
#include "openmm/internal/ForceImpl.h"
#include <torch/script.h>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace BackmapPlugin {

/**
 * The internal implementation of BackmapTorchForce inside a Context: it loads the module from the
 * force's bytes and hands it to the platform's kernel.
 */
class OPENMM_EXPORT_BACKMAP BackmapTorchForceImpl : public OpenMM::ForceImpl {
public:
    BackmapTorchForceImpl(const BackmapTorchForce& owner);
    ~BackmapTorchForceImpl();
    void initialize(OpenMM::ContextImpl& context);
    const BackmapTorchForce& getOwner() const {
        return owner;
    }
    void updateContextState(OpenMM::ContextImpl& context) {
    }
    double calcForcesAndEnergy(OpenMM::ContextImpl& context, bool includeForces, bool includeEnergy, int groups);
    std::map<std::string, double> getDefaultParameters();
    std::vector<std::string> getKernelNames();
    /**
     * Load a TorchScript module from its serialized bytes, with an error that says what went wrong.
     */
    static torch::jit::script::Module loadModule(const std::string& bytes);
    /**
     * Check that a compiled package fits the force and the System (particles, periodicity,
     * global parameters), with an error that names the mismatch.
     */
    static void checkCompiled(const BackmapCompiledModel& model, const BackmapTorchForce& force, int numParticles);
private:
    const BackmapTorchForce& owner;
    OpenMM::Kernel kernel;
    torch::jit::script::Module module;
    std::shared_ptr<BackmapCompiledModel> compiled;
};

} // namespace BackmapPlugin

#endif /*BACKMAP_TORCH_FORCE_IMPL_H_*/
