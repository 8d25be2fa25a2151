#include "internal/BackmapTorchForceImpl.h"
#include "BackmapKernels.h"
#include "openmm/OpenMMException.h"
#include "openmm/internal/ContextImpl.h"
#include <sstream>

using namespace BackmapPlugin;
using namespace OpenMM;
using namespace std;

BackmapTorchForceImpl::BackmapTorchForceImpl(const BackmapTorchForce& owner) : owner(owner) {
}

BackmapTorchForceImpl::~BackmapTorchForceImpl() {
}

torch::jit::script::Module BackmapTorchForceImpl::loadModule(const string& bytes) {
    if (bytes.empty())
        throw OpenMMException("BackmapTorchForce: no TorchScript module was set");
    istringstream stream(bytes);
    try {
        return torch::jit::load(stream);
    }
    catch (const std::exception& e) {
        throw OpenMMException(string("BackmapTorchForce: the module bytes are not a loadable TorchScript module: ") + e.what());
    }
}

void BackmapTorchForceImpl::initialize(ContextImpl& context) {
    const BackmapTorchForce& force = owner;
    for (int i = 0; i < force.getNumEnergyParameterDerivatives(); i++) {
        const string& name = force.getEnergyParameterDerivativeName(i);
        bool found = false;
        for (int j = 0; j < force.getNumGlobalParameters(); j++)
            found |= (force.getGlobalParameterName(j) == name);
        if (!found)
            throw OpenMMException("BackmapTorchForce: energy parameter derivative requested for '" + name + "', which is not a global parameter of the force");
    }
    if (force.getModuleBytes().empty())
        throw OpenMMException("BackmapTorchForce: no TorchScript module was set");
    if (force.isCompiled()) {
        compiled = std::make_shared<BackmapCompiledModel>(force.getModuleBytes());
        checkCompiled(*compiled, force, context.getSystem().getNumParticles());
        kernel = context.getPlatform().createKernel(CalcBackmapTorchForceKernel::Name(), context);
        kernel.getAs<CalcBackmapTorchForceKernel>().initialize(context.getSystem(), force, module, compiled);
        return;
    }
    module = loadModule(force.getModuleBytes());
    module.eval();

    // Check the number of forward() arguments here, so a mismatch is reported when the Context is
    // created and not as an obscure interpreter error on the first step.
    if (module.find_method("forward")) {
        const c10::FunctionSchema& schema = module.get_method("forward").function().getSchema();
        size_t expected = 2 + (force.usesPeriodicBoundaryConditions() ? 1 : 0) + force.getNumGlobalParameters();
        size_t given = schema.arguments().size();
        size_t required = 0;
        for (const c10::Argument& a : schema.arguments())
            if (!a.default_value())
                required++;
        if (required > expected || given < expected) {
            ostringstream msg;
            msg << "BackmapTorchForce: forward() takes " << (given - 1) << " argument(s) but the force passes " << (expected - 1)
                << " (positions" << (force.usesPeriodicBoundaryConditions() ? ", box vectors" : "")
                << (force.getNumGlobalParameters() > 0 ? ", global parameters" : "") << ")";
            throw OpenMMException(msg.str());
        }
    }
    else
        throw OpenMMException("BackmapTorchForce: the TorchScript module has no forward() method");

    kernel = context.getPlatform().createKernel(CalcBackmapTorchForceKernel::Name(), context);
    kernel.getAs<CalcBackmapTorchForceKernel>().initialize(context.getSystem(), force, module, nullptr);
}

void BackmapTorchForceImpl::checkCompiled(const BackmapCompiledModel& model, const BackmapTorchForce& force, int numParticles) {
    if (model.numParticles != numParticles)
        throw OpenMMException("BackmapTorchForce: the compiled package was built for " + to_string(model.numParticles)
                + " particles, but the System has " + to_string(numParticles));
    if (model.periodic != force.usesPeriodicBoundaryConditions())
        throw OpenMMException(string("BackmapTorchForce: the compiled package was built ")
                + (model.periodic ? "with" : "without") + " periodic boundary conditions, but the force "
                + (force.usesPeriodicBoundaryConditions() ? "uses" : "does not use") + " them");
    vector<string> names;
    for (int i = 0; i < force.getNumGlobalParameters(); i++)
        names.push_back(force.getGlobalParameterName(i));
    if (names != model.globalParameters) {
        string given, built;
        for (const string& n : names)
            given += (given.empty() ? "" : ", ") + n;
        for (const string& n : model.globalParameters)
            built += (built.empty() ? "" : ", ") + n;
        throw OpenMMException("BackmapTorchForce: the compiled package takes the global parameters [" + built
                + "] but the force has [" + given + "]");
    }
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
