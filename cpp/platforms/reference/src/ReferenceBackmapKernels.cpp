#include "ReferenceBackmapKernels.h"
#include "openmm/internal/ContextImpl.h"
#include "openmm/reference/ReferencePlatform.h"
#include <ATen/ATen.h>

using namespace BackmapPlugin;
using namespace OpenMM;
using namespace std;

void ReferenceCalcBackmapTorchForceKernel::initialize(const System& system, const BackmapTorchForce& force, shared_ptr<BackmapEnergyModel> model) {
    this->model = model;
    model->moveTo(c10::Device(c10::kCPU));
    options = model->getInputOptions();
    parameters = BackmapGlobalParameters(force);
    periodic = force.usesPeriodicBoundaryConditions();
}

double ReferenceCalcBackmapTorchForceKernel::execute(ContextImpl& context, bool includeForces, bool includeEnergy) {
    ReferencePlatform::PlatformData* data = reinterpret_cast<ReferencePlatform::PlatformData*>(context.getPlatformData());
    vector<Vec3>& pos = *data->positions;
    int numParticles = pos.size();
    // Vec3 is three contiguous doubles, so the position array is an (n, 3) float64 buffer; copy it
    // (converting to the model's dtype) so the model never aliases OpenMM's memory.
    at::Tensor positions = at::from_blob(pos.data(), {numParticles, 3}, at::kDouble).to(options, false, true);
    at::Tensor box;
    if (periodic)
        box = at::from_blob(data->periodicBoxVectors, {3, 3}, at::kDouble).to(options, false, true);
    BackmapEvaluation result = model->evaluate(positions, box, parameters.getValues(context), includeForces);
    if (includeForces && result.forces.defined()) {
        at::Tensor f = result.forces.to(at::kDouble).contiguous();
        const double* forceData = f.data_ptr<double>();
        vector<Vec3>& forces = *data->forces;
        for (int i = 0; i < numParticles; i++)
            forces[i] += Vec3(forceData[3*i], forceData[3*i+1], forceData[3*i+2]);
    }
    parameters.addDerivatives(result.parameterDerivatives, *data->energyParameterDerivatives);
    return includeEnergy ? result.energy.item<double>() : 0.0;
}
