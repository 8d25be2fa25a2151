/*
 * XML round trip of a BackmapTorchForce: module bytes, settings, and the energy it gives on the
 * Reference platform before and after; version-1 XML (no checksum) is still read, a newer version
 * and a damaged module are refused.
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
#include <regex>
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

static void testCrc32() {
    // The standard check value of CRC-32 (zlib.crc32(b"123456789")), and the empty string.
    ASSERT_EQUAL(0xCBF43926u, BackmapTorchForceProxy::crc32("123456789"));
    ASSERT_EQUAL(0u, BackmapTorchForceProxy::crc32(""));
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

/** The XML of a force with a global parameter k = 1.75 and dE/dk, as this plugin writes it. */
static string currentXml() {
    BackmapTorchForce force;
    force.setModuleBytes(BackmapTest::harmonicParameterModule());
    force.addGlobalParameter("k", 1.75);
    force.addEnergyParameterDerivative("k");
    force.setForceGroup(1);
    stringstream buffer;
    XmlSerializer::serialize<Force>(&force, "Force", buffer);
    return buffer.str();
}

static Force* readForce(const string& xml) {
    stringstream buffer(xml);
    return XmlSerializer::deserialize<Force>(buffer);
}

static void expectReadError(const string& xml, const string& fragment) {
    bool thrown = false;
    try {
        delete readForce(xml);
    }
    catch (const OpenMMException& e) {
        thrown = true;
        if (string(e.what()).find(fragment) == string::npos)
            throw OpenMMException("expected an error containing '" + fragment + "', got: " + e.what());
    }
    if (!thrown)
        throw OpenMMException("expected an error containing '" + fragment + "'");
}

static void testVersions() {
    string xml = currentXml();
    ASSERT(regex_search(xml, regex("version=\"2\"")));
    ASSERT(regex_search(xml, regex("moduleCrc32=\"[0-9a-f]{8}\"")));

    // Version 1 wrote the same fields without the checksum: such files are still read, to the same
    // force and the same energy.
    string version1 = regex_replace(regex_replace(xml, regex(" moduleCrc32=\"[0-9a-f]{8}\""), ""),
                                    regex("version=\"2\""), "version=\"1\"");
    ASSERT(version1.find("moduleCrc32") == string::npos && version1.find("version=\"1\"") != string::npos);
    Force* old = readForce(version1);
    const BackmapTorchForce& force = dynamic_cast<const BackmapTorchForce&>(*old);
    ASSERT(force.getModuleBytes() == BackmapTest::harmonicParameterModule());
    ASSERT_EQUAL(1, force.getForceGroup());
    ASSERT_EQUAL(1, force.getNumGlobalParameters());
    ASSERT_EQUAL(string("k"), force.getGlobalParameterName(0));
    ASSERT_EQUAL(1.75, force.getGlobalParameterDefaultValue(0));
    ASSERT_EQUAL(string("k"), force.getEnergyParameterDerivativeName(0));
    System system;
    for (int i = 0; i < 4; i++)
        system.addParticle(1.0);
    system.addForce(old);
    double expected = 0.0;
    for (int i = 0; i < 4; i++) {
        Vec3 r(0.1*i, -0.2*i+0.3, 0.05*i*i);
        expected += 1.75*r.dot(r);
    }
    ASSERT_EQUAL_TOL(expected, energyOf(system), 1e-12);

    // A newer version is refused with a message that says so.
    expectReadError(regex_replace(xml, regex("version=\"2\""), "version=\"3\""), "versions up to 2");

    // One changed base64 character keeps the length but not the checksum: refused in version 2.
    size_t start = xml.find(" module=\"") + 9, end = xml.find('"', start);
    ASSERT(start > 9 && end != string::npos && end - start > 100);
    size_t at = (start + end)/2;
    string damaged = xml;
    damaged[at] = (damaged[at] == 'A' ? 'B' : 'A');
    expectReadError(damaged, "CRC-32");
}

int main() {
    try {
        registerBackmapReferenceKernelFactories();
        testBase64();
        testCrc32();
        testRoundTrip();
        testVersions();
    }
    catch (const exception& e) {
        cout << "exception: " << e.what() << endl;
        return 1;
    }
    cout << "Done" << endl;
    return 0;
}
