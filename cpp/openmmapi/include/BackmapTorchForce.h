#ifndef BACKMAP_TORCH_FORCE_H_
#define BACKMAP_TORCH_FORCE_H_

#include "openmm/Force.h"
#include "openmm/Context.h"
#include "internal/windowsExportBackmap.h"
#include <string>
#include <vector>

namespace BackmapPlugin {

/**
 * A force whose energy is computed by a TorchScript module and whose forces are the negative
 * gradient of that energy, obtained by autograd.
 *
 * The module's forward method is called as
 *
 *     forward(positions[, boxVectors][, p_1, ..., p_m]) -> energy
 *
 * where positions is a (numParticles, 3) tensor in nm, boxVectors a (3, 3) tensor in nm (rows are
 * the box vectors, passed only when usesPeriodicBoundaryConditions() is true), and p_i are the
 * values of the global parameters in the order they were added, each as a 0-dimensional tensor.
 * The result must hold exactly one element, the energy in kJ/mol.  Inputs have the dtype of the
 * module's first floating-point parameter or buffer (float64 if it has none).
 *
 * The force keeps the serialized module bytes, so it can be copied and written to XML without the
 * original file.
 *
 * The bytes may instead be a compiled force package (.pt2, written by openmm_backmap.openmm.compiled or
 * `openmm-backmap compile`): an AOTInductor library that computes the energy, the forces and the
 * energy parameter derivatives in one call, with fused loops in place of one dispatch per operator.
 * It takes the same inputs as forward() (in float64), is specialised to its number of particles,
 * and runs on the Reference and CPU platforms.  isCompiled() tells which kind the force holds.
 */
class OPENMM_EXPORT_BACKMAP BackmapTorchForce : public OpenMM::Force {
public:
    /**
     * Create a force from a TorchScript file (as written by torch.jit.save).
     *
     * @param file   path of the .pt file; its bytes are read immediately
     */
    explicit BackmapTorchForce(const std::string& file);
    /**
     * Create a force with no module; set one with setModuleBytes() before creating a Context.
     */
    BackmapTorchForce();
    /**
     * Get the serialized TorchScript module (the content of a .pt file).
     */
    const std::string& getModuleBytes() const;
    /**
     * Set the serialized TorchScript module (the content of a .pt file).
     */
    void setModuleBytes(const std::string& bytes);
    /**
     * Whether the module bytes are a compiled force package (.pt2) rather than a TorchScript file.
     */
    bool isCompiled() const;
    /**
     * Get the path the module was read from (empty when it was given as bytes).
     */
    const std::string& getFile() const;
    /**
     * Set whether the force uses periodic boundary conditions; if so the box vectors are passed
     * to forward() after the positions.
     */
    void setUsesPeriodicBoundaryConditions(bool periodic);
    /**
     * Get whether the force uses periodic boundary conditions.
     */
    bool usesPeriodicBoundaryConditions() const;
    /**
     * Get the number of global parameters passed to the module.
     */
    int getNumGlobalParameters() const;
    /**
     * Add a global parameter; it is passed to forward() as a scalar tensor after the positions
     * (and box vectors).
     *
     * @param name          the parameter's name in the Context
     * @param defaultValue  its value in newly created Contexts
     * @return the index of the parameter
     */
    int addGlobalParameter(const std::string& name, double defaultValue);
    /**
     * Get the name of a global parameter.
     */
    const std::string& getGlobalParameterName(int index) const;
    /**
     * Set the name of a global parameter.
     */
    void setGlobalParameterName(int index, const std::string& name);
    /**
     * Get the default value of a global parameter.
     */
    double getGlobalParameterDefaultValue(int index) const;
    /**
     * Set the default value of a global parameter.
     */
    void setGlobalParameterDefaultValue(int index, double defaultValue);
    /**
     * Request the derivative of the energy with respect to a global parameter (computed by
     * autograd); it is reported by State::getEnergyParameterDerivatives().
     *
     * @param name  the name of a global parameter of this force
     */
    void addEnergyParameterDerivative(const std::string& name);
    /**
     * Get the number of global parameters whose energy derivative is computed.
     */
    int getNumEnergyParameterDerivatives() const;
    /**
     * Get the name of a global parameter whose energy derivative is computed.
     */
    const std::string& getEnergyParameterDerivativeName(int index) const;
protected:
    OpenMM::ForceImpl* createImpl() const;
private:
    class GlobalParameterInfo;
    std::string file, moduleBytes;
    bool periodic;
    std::vector<GlobalParameterInfo> globalParameters;
    std::vector<std::string> energyParameterDerivatives;
};

/**
 * Name and default value of a global parameter of a BackmapTorchForce.
 */
class BackmapTorchForce::GlobalParameterInfo {
public:
    std::string name;
    double defaultValue;
    GlobalParameterInfo() : defaultValue(0.0) {
    }
    GlobalParameterInfo(const std::string& name, double defaultValue) : name(name), defaultValue(defaultValue) {
    }
};

} // namespace BackmapPlugin

#endif /*BACKMAP_TORCH_FORCE_H_*/
