#ifndef BACKMAP_TORCH_FORCE_IMPL_H_
#define BACKMAP_TORCH_FORCE_IMPL_H_

#include "BackmapTorchForce.h"
#include "openmm/Kernel.h"
#include "openmm/internal/ForceImpl.h"
#include <map>
#include <string>
#include <vector>

namespace BackmapPlugin {

/**
 * The internal implementation of BackmapTorchForce inside a Context: it loads the force's model
 * (BackmapEnergyModel::create chooses TorchScript or compiled package) and hands it to the
 * platform's kernel.
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
private:
    const BackmapTorchForce& owner;
    OpenMM::Kernel kernel;
};

} // namespace BackmapPlugin

#endif /*BACKMAP_TORCH_FORCE_IMPL_H_*/
