#include "ReferenceBackmapKernels.h"
#include "internal/BackmapTorchUtilities.h"
#include "openmm/OpenMMException.h"
#include "openmm/internal/ContextImpl.h"
#include "openmm/reference/ReferencePlatform.h"
#include <torch/csrc/autograd/autograd.h>
#include <algorithm>

using namespace BackmapPlugin;
using namespace OpenMM;
using namespace std;

void ReferenceCalcBackmapTorchForceKernel::initialize(const System& system, const BackmapTorchForce& force, torch::jit::script::Module& module,
                                                      shared_ptr<BackmapCompiledModel> compiled) {
    this->compiled = compiled;
    if (!compiled) {
        this->module = module;
        dtype = backmapModuleDtype(module);
    }
    periodic = force.usesPeriodicBoundaryConditions();
    for (int i = 0; i < force.getNumGlobalParameters(); i++) {
        const string& name = force.getGlobalParameterName(i);
        bool derivative = false;
        for (int j = 0; j < force.getNumEnergyParameterDerivatives(); j++)
            derivative |= (force.getEnergyParameterDerivativeName(j) == name);
        globalNames.push_back(name);
        globalNeedsDerivative.push_back(derivative);
    }
    inputs.reserve(1 + (periodic ? 1 : 0) + globalNames.size());
}

double ReferenceCalcBackmapTorchForceKernel::executeCompiled(ContextImpl& context, bool includeForces, bool includeEnergy) {
    ReferencePlatform::PlatformData* data = reinterpret_cast<ReferencePlatform::PlatformData*>(context.getPlatformData());
    vector<Vec3>& pos = *data->positions;
    int numParticles = pos.size();
    torch::TensorOptions options = torch::TensorOptions().dtype(torch::kFloat64);
    // The package reads its inputs and returns new tensors, so OpenMM's arrays can be passed in place.
    compiledInputs.clear();
    compiledInputs.push_back(torch::from_blob(pos.data(), {numParticles, 3}, options));
    if (periodic)
        compiledInputs.push_back(torch::from_blob(data->periodicBoxVectors, {3, 3}, options));
    for (const string& name : globalNames)
        compiledInputs.push_back(torch::scalar_tensor(context.getParameter(name), options));
    vector<at::Tensor> outputs = compiled->run(compiledInputs);
    compiledInputs.clear();
    if (outputs.size() != 2 + globalNames.size())
        throw OpenMMException("BackmapTorchForce: the compiled package returned " + to_string(outputs.size())
                + " outputs, expected " + to_string(2 + globalNames.size()));
    double energyValue = outputs[0].item<double>();
    if (includeForces) {
        at::Tensor f = outputs[1].to(torch::kFloat64).contiguous();
        const double* forceData = f.data_ptr<double>();
        vector<Vec3>& forces = *data->forces;
        for (int i = 0; i < numParticles; i++)
            forces[i] += Vec3(forceData[3*i], forceData[3*i+1], forceData[3*i+2]);
    }
    map<string, double>& derivatives = *data->energyParameterDerivatives;
    for (size_t i = 0; i < globalNames.size(); i++)
        if (globalNeedsDerivative[i])
            derivatives[globalNames[i]] += outputs[2 + i].item<double>();
    return includeEnergy ? energyValue : 0.0;
}

double ReferenceCalcBackmapTorchForceKernel::execute(ContextImpl& context, bool includeForces, bool includeEnergy) {
    if (compiled)
        return executeCompiled(context, includeForces, includeEnergy);
    ReferencePlatform::PlatformData* data = reinterpret_cast<ReferencePlatform::PlatformData*>(context.getPlatformData());
    vector<Vec3>& pos = *data->positions;
    int numParticles = pos.size();
    bool anyDerivative = any_of(globalNeedsDerivative.begin(), globalNeedsDerivative.end(), [](bool b) { return b; });
    bool needGrad = includeForces || anyDerivative;
    torch::AutoGradMode gradMode(needGrad);

    // Vec3 is three contiguous doubles, so the position array is an (n, 3) float64 buffer; copy it
    // (converting to the module's dtype) so the module never aliases OpenMM's memory.
    torch::Tensor positions = torch::from_blob(pos.data(), {numParticles, 3}, torch::kFloat64).to(dtype, false, true);
    if (includeForces)
        positions.requires_grad_(true);
    inputs.clear();
    inputs.push_back(positions);
    if (periodic)
        inputs.push_back(torch::from_blob(data->periodicBoxVectors, {3, 3}, torch::kFloat64).to(dtype, false, true));
    vector<torch::Tensor> gradTargets, derivativeTensors;
    vector<string> derivativeNames;
    if (includeForces)
        gradTargets.push_back(positions);
    torch::TensorOptions options = torch::TensorOptions().dtype(dtype);
    for (size_t i = 0; i < globalNames.size(); i++) {
        torch::Tensor p = torch::scalar_tensor(context.getParameter(globalNames[i]), options);
        if (globalNeedsDerivative[i]) {
            p.requires_grad_(true);
            gradTargets.push_back(p);
            derivativeNames.push_back(globalNames[i]);
        }
        inputs.push_back(p);
    }
    torch::Tensor energy = backmapRunForward(module, inputs);
    double energyValue = energy.item<double>();

    if (!gradTargets.empty()) {
        vector<torch::Tensor> grads;
        if (energy.requires_grad())
            grads = torch::autograd::grad({energy}, gradTargets, {}, false, false, true);
        else
            grads.resize(gradTargets.size());
        size_t next = 0;
        if (includeForces) {
            torch::Tensor g = grads[next++];
            if (g.defined()) {
                g = g.to(torch::kFloat64).contiguous();
                const double* gradData = g.data_ptr<double>();
                vector<Vec3>& forces = *data->forces;
                for (int i = 0; i < numParticles; i++)
                    forces[i] -= Vec3(gradData[3*i], gradData[3*i+1], gradData[3*i+2]);
            }
        }
        map<string, double>& derivatives = *data->energyParameterDerivatives;
        for (size_t i = 0; i < derivativeNames.size(); i++, next++) {
            double value = (grads[next].defined() ? grads[next].item<double>() : 0.0);
            derivatives[derivativeNames[i]] += value;
        }
    }
    inputs.clear();
    return includeEnergy ? energyValue : 0.0;
}
