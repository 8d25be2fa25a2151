#ifndef BACKMAP_GLOBAL_PARAMETERS_H_
#define BACKMAP_GLOBAL_PARAMETERS_H_

#include "BackmapTorchForce.h"
#include "internal/windowsExportBackmap.h"
#include "openmm/internal/ContextImpl.h"
#include <map>
#include <string>
#include <vector>

namespace BackmapPlugin {

/**
 * The global parameters of a BackmapTorchForce as the models and kernels use them: their names in
 * the order they are passed to the model, and which of them need dE/dp.  Shared by every platform's
 * kernel and by both kinds of model.
 */
class OPENMM_EXPORT_BACKMAP BackmapGlobalParameters {
public:
    BackmapGlobalParameters() = default;
    /**
     * Read the parameters of a force.  Throws OpenMMException when an energy parameter derivative
     * is requested for a name that is not one of its global parameters.
     */
    explicit BackmapGlobalParameters(const BackmapTorchForce& force);
    /** The number of global parameters. */
    int size() const {
        return names.size();
    }
    /** The name of parameter i (in the order of BackmapTorchForce::addGlobalParameter). */
    const std::string& getName(int i) const {
        return names[i];
    }
    /** Whether dE/dp of parameter i is requested. */
    bool needsDerivative(int i) const {
        return derivative[i];
    }
    /** Whether any parameter derivative is requested. */
    bool anyDerivative() const {
        return numDerivatives > 0;
    }
    /** The names, in order. */
    const std::vector<std::string>& getNames() const {
        return names;
    }
    /** The parameters' current values in a Context, in order. */
    std::vector<double> getValues(OpenMM::ContextImpl& context) const;
    /**
     * Add dE/dp (one value per parameter, in order) of the parameters whose derivative is requested
     * to a platform's map of energy parameter derivatives.
     */
    void addDerivatives(const std::vector<double>& values, std::map<std::string, double>& derivatives) const;
private:
    std::vector<std::string> names;
    std::vector<bool> derivative;
    int numDerivatives = 0;
};

} // namespace BackmapPlugin

#endif /*BACKMAP_GLOBAL_PARAMETERS_H_*/
