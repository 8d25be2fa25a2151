#include "internal/BackmapTorchForceImpl.h"
#include "BackmapKernels.h"
#include "internal/BackmapEnergyModel.h"
#include "openmm/internal/ContextImpl.h"

using namespace BackmapPlugin;
using namespace OpenMM;
using namespace std;

BackmapTorchForceImpl::BackmapTorchForceImpl(const BackmapTorchForce& owner) : owner(owner) {
}

BackmapTorchForceImpl::~BackmapTorchForceImpl() {
}

void BackmapTorchForceImpl::initialize(ContextImpl& context) {
    // Load and check the model here, so a bad model is reported when the Context is created.
    shared_ptr<BackmapEnergyModel> model = BackmapEnergyModel::create(owner, context.getSystem().getNumParticles());
    kernel = context.getPlatform().createKernel(CalcBackmapTorchForceKernel::Name(), context);
    kernel.getAs<CalcBackmapTorchForceKernel>().initialize(context.getSystem(), owner, model);
}

double BackmapTorchForceImpl::calcForcesAndEnergy(ContextImpl& context, bool includeForces, bool includeEnergy, int groups) {
    if ((groups & (1 << owner.getForceGroup())) != 0)
        return kernel.getAs<CalcBackmapTorchForceKernel>().execute(context, includeForces, includeEnergy);
    return 0.0;
}

map<string, double> BackmapTorchForceImpl::getDefaultParameters() {
    map<string, double> parameters;
    for (int i = 0; i < owner.getNumGlobalParameters(); i++)
        parameters[owner.getGlobalParameterName(i)] = owner.getGlobalParameterDefaultValue(i);
    return parameters;
}

vector<string> BackmapTorchForceImpl::getKernelNames() {
    return {CalcBackmapTorchForceKernel::Name()};
}
