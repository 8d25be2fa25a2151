#ifndef BACKMAP_ENERGY_MODEL_H_
#define BACKMAP_ENERGY_MODEL_H_

#include "BackmapTorchForce.h"
#include "internal/windowsExportBackmap.h"
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/TensorOptions.h>
#include <memory>
#include <vector>

namespace BackmapPlugin {

/**
 * What one evaluation of a BackmapEnergyModel gives.
 */
struct BackmapEvaluation {
    /** The energy in kJ/mol, a 0-dimensional tensor on the model's device (reading it may synchronise). */
    at::Tensor energy;
    /** The forces -dE/dx, (numParticles, 3) in kJ/mol/nm; undefined when not requested or when the energy does not depend on the positions. */
    at::Tensor forces;
    /** dE/dp of every global parameter in order, in kJ/mol per parameter unit (0 where not requested). */
    std::vector<double> parameterDerivatives;
};

/**
 * The model a BackmapTorchForce holds, as the kernels call it: a strategy chosen once, when the
 * Context is created, from the force's bytes.  BackmapTorchScriptModel runs a TorchScript module
 * and takes forces and dE/dp from autograd; BackmapCompiledModel runs a compiled force package
 * (.pt2) that returns them itself.  Kernels only move positions, box vectors, parameter values,
 * forces and derivatives between OpenMM's arrays and these calls.
 */
class OPENMM_EXPORT_BACKMAP BackmapEnergyModel {
public:
    virtual ~BackmapEnergyModel() {
    }
    /**
     * Load the model held by a force (a compiled package when force.isCompiled(), else a
     * TorchScript module) and check it against the force and the System, with an error that names
     * the mismatch.
     *
     * @param force         the force
     * @param numParticles  the number of particles in the System
     */
    static std::shared_ptr<BackmapEnergyModel> create(const BackmapTorchForce& force, int numParticles);
    /**
     * The dtype and device that evaluate() takes its positions and box vectors in.
     */
    virtual c10::TensorOptions getInputOptions() const = 0;
    /**
     * Move the model to a device (once, before the first evaluation); throws OpenMMException when
     * this kind of model cannot run there.
     */
    virtual void moveTo(const c10::Device& device) = 0;
    /**
     * Compute the energy, and the forces when asked, and dE/dp of the parameters whose derivative
     * the force requests.
     *
     * @param positions      (numParticles, 3) in nm, with getInputOptions(); a tensor the caller
     *                       owns for this call (it must not alias OpenMM's own arrays), which the
     *                       model may use as an autograd leaf
     * @param box            (3, 3) box vectors in nm (rows), with getInputOptions(), or an
     *                       undefined tensor when the force is not periodic
     * @param parameters     the values of the global parameters, in order
     * @param includeForces  whether forces are wanted
     */
    virtual BackmapEvaluation evaluate(const at::Tensor& positions, const at::Tensor& box, const std::vector<double>& parameters,
                                       bool includeForces) = 0;
};

} // namespace BackmapPlugin

#endif /*BACKMAP_ENERGY_MODEL_H_*/
