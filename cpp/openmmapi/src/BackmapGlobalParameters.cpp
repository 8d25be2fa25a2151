#include "internal/BackmapGlobalParameters.h"
#include "openmm/OpenMMException.h"

using namespace BackmapPlugin;
using namespace OpenMM;
using namespace std;

BackmapGlobalParameters::BackmapGlobalParameters(const BackmapTorchForce& force) {
    for (int i = 0; i < force.getNumGlobalParameters(); i++) {
        names.push_back(force.getGlobalParameterName(i));
        derivative.push_back(false);
    }
    for (int j = 0; j < force.getNumEnergyParameterDerivatives(); j++) {
        const string& name = force.getEnergyParameterDerivativeName(j);
        bool found = false;
        for (size_t i = 0; i < names.size(); i++)
            if (names[i] == name) {
                found = true;
                if (!derivative[i])
                    numDerivatives++;
                derivative[i] = true;
            }
        if (!found)
            throw OpenMMException("BackmapTorchForce: energy parameter derivative requested for '" + name
                    + "', which is not a global parameter of the force");
    }
}

vector<double> BackmapGlobalParameters::getValues(ContextImpl& context) const {
    vector<double> values;
    values.reserve(names.size());
    for (const string& name : names)
        values.push_back(context.getParameter(name));
    return values;
}

void BackmapGlobalParameters::addDerivatives(const vector<double>& values, map<string, double>& derivatives) const {
    if (values.size() != names.size())
        throw OpenMMException("BackmapTorchForce: the model returned " + to_string(values.size())
                + " parameter derivatives for " + to_string(names.size()) + " global parameters");
    for (size_t i = 0; i < names.size(); i++)
        if (derivative[i])
            derivatives[names[i]] += values[i];
}
