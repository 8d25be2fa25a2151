/*
 * XML round trip of a BackmapTorchForce: module bytes, settings, and the energy it gives on the
 * Reference platform before and after.
 */

#include "BackmapTestModels.h"
#include "BackmapTorchForce.h"
#include "BackmapTorchForceProxy.h"
#include "openmm/Context.h"
#include "openmm/Platform.h"
#include "openmm/System.h"
#include "openmm/VerletIntegrator.h"
#include "openmm/internal/AssertionUtilities.h"
#include "openmm/serialization/XmlSerializer.h"
#include <iostream>
#include <sstream>

extern "C" void registerBackmapReferenceKernelFactories();

using namespace BackmapPlugin;
using namespace OpenMM;
using namespace std;

static void testBase64() {
    for (const string& s : {string(""), string("f"), string("fo"), string("foo"), string("foob"), string("fooba"), string("foobar")}) {
        string encoded = BackmapTorchForceProxy::encodeBase64(s);
        ASSERT_EQUAL(s, BackmapTorchForceProxy::decodeBase64(encoded));
    }
    ASSERT_EQUAL(string("Zm9vYmFy"), BackmapTorchForceProxy::encodeBase64("foobar"));
    ASSERT_EQUAL(string("Zm8="), BackmapTorchForceProxy::encodeBase64("fo"));
    string binary;
    for (int i = 0; i < 256; i++)
        binary += (char) i;
    ASSERT(binary == BackmapTorchForceProxy::decodeBase64(BackmapTorchForceProxy::encodeBase64(binary)));
    bool thrown = false;
    try {
        BackmapTorchForceProxy::decodeBase64("Zm9v!mFy");
    }
    catch (const OpenMMException&) {
        thrown = true;
    }
    ASSERT(thrown);
}

static double energyOf(System& system) {
    VerletIntegrator integrator(0.001);
    Context context(system, integrator, Platform::getPlatformByName("Reference"));
    vector<Vec3> positions;
    for (int i = 0; i < system.getNumParticles(); i++)
        positions.push_back(Vec3(0.1*i, -0.2*i+0.3, 0.05*i*i));
    context.setPositions(positions);
    return context.getState(State::Energy).getPotentialEnergy();
}

static void testRoundTrip() {
    BackmapTorchForce* force = new BackmapTorchForce();
    force->setModuleBytes(BackmapTest::harmonicParameterModule());
    force->setForceGroup(2);
    force->setName("cg potential");
    force->addGlobalParameter("k", 1.75);
    force->addEnergyParameterDerivative("k");
    System system;
    for (int i = 0; i < 5; i++)
        system.addParticle(12.0);
    system.addForce(force);

    stringstream buffer;
    XmlSerializer::serialize<System>(&system, "System", buffer);
    System* copy = XmlSerializer::deserialize<System>(buffer);
    const BackmapTorchForce& force2 = dynamic_cast<const BackmapTorchForce&>(copy->getForce(0));
    ASSERT(force->getModuleBytes() == force2.getModuleBytes());
    ASSERT_EQUAL(force->getForceGroup(), force2.getForceGroup());
    ASSERT_EQUAL(force->getName(), force2.getName());
    ASSERT_EQUAL(force->usesPeriodicBoundaryConditions(), force2.usesPeriodicBoundaryConditions());
    ASSERT_EQUAL(force->getNumGlobalParameters(), force2.getNumGlobalParameters());
    ASSERT_EQUAL(force->getGlobalParameterName(0), force2.getGlobalParameterName(0));
    ASSERT_EQUAL(force->getGlobalParameterDefaultValue(0), force2.getGlobalParameterDefaultValue(0));
    ASSERT_EQUAL(force->getNumEnergyParameterDerivatives(), force2.getNumEnergyParameterDerivatives());
    ASSERT_EQUAL(force->getEnergyParameterDerivativeName(0), force2.getEnergyParameterDerivativeName(0));
    double e1 = energyOf(system), e2 = energyOf(*copy);
    ASSERT(e1 > 0.0);
    ASSERT_EQUAL_TOL(e1, e2, 1e-12);
    delete copy;

    // A periodic force keeps its flag.
    BackmapTorchForce periodic;
    periodic.setModuleBytes(BackmapTest::periodicModule());
    periodic.setUsesPeriodicBoundaryConditions(true);
    stringstream buffer2;
    XmlSerializer::serialize<Force>(&periodic, "Force", buffer2);
    Force* periodicCopy = XmlSerializer::deserialize<Force>(buffer2);
    ASSERT(periodicCopy->usesPeriodicBoundaryConditions());
    ASSERT(dynamic_cast<BackmapTorchForce&>(*periodicCopy).getModuleBytes() == periodic.getModuleBytes());
    delete periodicCopy;
}

int main() {
    try {
        registerBackmapReferenceKernelFactories();
        testBase64();
        testRoundTrip();
    }
    catch (const exception& e) {
        cout << "exception: " << e.what() << endl;
        return 1;
    }
    cout << "Done" << endl;
    return 0;
}
