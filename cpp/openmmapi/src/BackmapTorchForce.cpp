#include "BackmapTorchForce.h"
#include "internal/BackmapTorchForceImpl.h"
#include "openmm/OpenMMException.h"
#include "openmm/internal/AssertionUtilities.h"
#include <fstream>
#include <sstream>

using namespace BackmapPlugin;
using namespace OpenMM;
using namespace std;

BackmapTorchForce::BackmapTorchForce() : periodic(false) {
}

BackmapTorchForce::BackmapTorchForce(const string& file) : file(file), periodic(false) {
    ifstream in(file, ios::binary);
    if (!in)
        throw OpenMMException("BackmapTorchForce: cannot open TorchScript file '" + file + "'");
    ostringstream buffer;
    buffer << in.rdbuf();
    moduleBytes = buffer.str();
    if (moduleBytes.empty())
        throw OpenMMException("BackmapTorchForce: TorchScript file '" + file + "' is empty");
}

const string& BackmapTorchForce::getModuleBytes() const {
    return moduleBytes;
}

void BackmapTorchForce::setModuleBytes(const string& bytes) {
    moduleBytes = bytes;
    file.clear();
}

bool BackmapTorchForce::isCompiled() const {
    // An AOTInductor package is a zip archive whose entries live under <name>/data/aotinductor/;
    // entry names are stored uncompressed, and a TorchScript archive never has that directory.
    return moduleBytes.size() > 2 && moduleBytes.compare(0, 2, "PK") == 0
            && moduleBytes.find("/data/aotinductor/") != string::npos;
}

const string& BackmapTorchForce::getFile() const {
    return file;
}

void BackmapTorchForce::setUsesPeriodicBoundaryConditions(bool periodic) {
    this->periodic = periodic;
}

bool BackmapTorchForce::usesPeriodicBoundaryConditions() const {
    return periodic;
}

int BackmapTorchForce::getNumGlobalParameters() const {
    return globalParameters.size();
}

int BackmapTorchForce::addGlobalParameter(const string& name, double defaultValue) {
    for (const GlobalParameterInfo& p : globalParameters)
        if (p.name == name)
            throw OpenMMException("BackmapTorchForce: global parameter '" + name + "' was already added");
    globalParameters.push_back(GlobalParameterInfo(name, defaultValue));
    return globalParameters.size() - 1;
}

const string& BackmapTorchForce::getGlobalParameterName(int index) const {
    ASSERT_VALID_INDEX(index, globalParameters);
    return globalParameters[index].name;
}

void BackmapTorchForce::setGlobalParameterName(int index, const string& name) {
    ASSERT_VALID_INDEX(index, globalParameters);
    globalParameters[index].name = name;
}

double BackmapTorchForce::getGlobalParameterDefaultValue(int index) const {
    ASSERT_VALID_INDEX(index, globalParameters);
    return globalParameters[index].defaultValue;
}

void BackmapTorchForce::setGlobalParameterDefaultValue(int index, double defaultValue) {
    ASSERT_VALID_INDEX(index, globalParameters);
    globalParameters[index].defaultValue = defaultValue;
}

void BackmapTorchForce::addEnergyParameterDerivative(const string& name) {
    for (const string& d : energyParameterDerivatives)
        if (d == name)
            return;
    energyParameterDerivatives.push_back(name);
}

int BackmapTorchForce::getNumEnergyParameterDerivatives() const {
    return energyParameterDerivatives.size();
}

const string& BackmapTorchForce::getEnergyParameterDerivativeName(int index) const {
    ASSERT_VALID_INDEX(index, energyParameterDerivatives);
    return energyParameterDerivatives[index];
}

ForceImpl* BackmapTorchForce::createImpl() const {
    return new BackmapTorchForceImpl(*this);
}
