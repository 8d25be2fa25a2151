#ifndef BACKMAP_KERNELS_H_
#define BACKMAP_KERNELS_H_

#include "BackmapTorchForce.h"
#include "internal/BackmapCompiledModel.h"
#include "openmm/KernelImpl.h"
#include "openmm/Platform.h"
#include "openmm/System.h"
#include <torch/script.h>
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
     * @param module    the loaded TorchScript module (the kernel keeps its own handle to it); unused
     *                  when compiled is set
     * @param compiled  the loaded compiled package when the force holds one, else null
     */
    virtual void initialize(const OpenMM::System& system, const BackmapTorchForce& force, torch::jit::script::Module& module,
                            std::shared_ptr<BackmapCompiledModel> compiled) = 0;
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
