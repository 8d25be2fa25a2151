#ifndef BACKMAP_KERNELS_H_
#define BACKMAP_KERNELS_H_

#include "BackmapTorchForce.h"
#include "internal/BackmapEnergyModel.h"
#include "openmm/KernelImpl.h"
#include "openmm/Platform.h"
#include "openmm/System.h"
#include <memory>
#include <string>

namespace BackmapPlugin {

/**
 * Abstract kernel that evaluates a BackmapTorchForce on one platform.
 */
class CalcBackmapTorchForceKernel : public OpenMM::KernelImpl {
public:
    static std::string Name() {
        return "CalcBackmapTorchForce";
    }
    CalcBackmapTorchForceKernel(std::string name, const OpenMM::Platform& platform) : OpenMM::KernelImpl(name, platform) {
    }
    /**
     * Initialize the kernel.
     *
     * @param system  the System this kernel will be applied to
     * @param force   the BackmapTorchForce this kernel will be used for
     * @param model   the force's model, loaded and checked (a TorchScript module or a compiled
     *                package); the kernel moves it to its device and keeps it
     */
    virtual void initialize(const OpenMM::System& system, const BackmapTorchForce& force, std::shared_ptr<BackmapEnergyModel> model) = 0;
    /**
     * Compute the energy and add the forces.
     *
     * @param context        the context in which to execute this kernel
     * @param includeForces  true if forces should be computed
     * @param includeEnergy  true if the energy should be computed
     * @return the potential energy in kJ/mol
     */
    virtual double execute(OpenMM::ContextImpl& context, bool includeForces, bool includeEnergy) = 0;
};

} // namespace BackmapPlugin

#endif /*BACKMAP_KERNELS_H_*/
