#include "internal/BackmapEnergyModel.h"
#include "internal/BackmapCompiledModel.h"
#include "internal/BackmapTorchScriptModel.h"
#include "openmm/OpenMMException.h"

using namespace BackmapPlugin;
using namespace OpenMM;
using namespace std;

shared_ptr<BackmapEnergyModel> BackmapEnergyModel::create(const BackmapTorchForce& force, int numParticles) {
    // Check the parameter names first: that error is about the force, whatever its model.
    BackmapGlobalParameters parameters(force);
    const string& bytes = force.getModuleBytes();
    if (bytes.empty())
        throw OpenMMException("BackmapTorchForce: no TorchScript module was set");
    if (force.isCompiled())
        return make_shared<BackmapCompiledModel>(bytes, force, numParticles);
    return make_shared<BackmapTorchScriptModel>(bytes, force);
}
