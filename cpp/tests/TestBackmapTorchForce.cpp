/*
 * Tests of BackmapTorchForce on one platform, named on the command line:
 *     TestBackmapTorchForce <platform> <OpenMM plugin directory>
 * The same file runs for Reference, CPU and (where built) CUDA, so platforms are held to the same
 * physics: analytic energies and forces, F = -dE/dx by finite differences, global parameters and
 * their energy derivatives, periodic box input, float32 modules, force groups, and clear errors.
 */

#include "BackmapTestModels.h"
#include "BackmapTorchForce.h"
#include "openmm/Context.h"
#include "openmm/OpenMMException.h"
#include "openmm/Platform.h"
#include "openmm/State.h"
#include "openmm/System.h"
#include "openmm/VerletIntegrator.h"
#include "openmm/internal/AssertionUtilities.h"
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <random>
#include <vector>

extern "C" void registerBackmapReferenceKernelFactories();
#ifdef BACKMAP_TEST_CUDA
extern "C" void registerBackmapCudaKernelFactories();
#endif

using namespace BackmapPlugin;
using namespace OpenMM;
using namespace std;

static Platform* platform;
static double tolerance = 1e-10;

static vector<Vec3> randomPositions(int n, unsigned int seed) {
    mt19937 rng(seed);
    uniform_real_distribution<double> uniform(-1.0, 1.0);
    vector<Vec3> positions(n);
    for (Vec3& r : positions)
        r = Vec3(uniform(rng), uniform(rng), uniform(rng));
    return positions;
}

static System makeSystem(int n) {
    System system;
    for (int i = 0; i < n; i++)
        system.addParticle(1.0);
    return system;
}

static BackmapTorchForce* forceFromBytes(const string& bytes) {
    BackmapTorchForce* force = new BackmapTorchForce();
    force->setModuleBytes(bytes);
    return force;
}

/* F = -dE/dx: compare each force with a central difference of the energy along a random direction. */
static void checkFiniteDifferences(Context& context, const vector<Vec3>& positions, double relTolerance) {
    State state = context.getState(State::Forces);
    const vector<Vec3>& forces = state.getForces();
    double norm = 0.0;
    for (const Vec3& f : forces)
        norm += f.dot(f);
    norm = sqrt(norm);
    const double delta = 1e-4;
    vector<Vec3> plus(positions), minus(positions);
    for (size_t i = 0; i < positions.size(); i++) {
        plus[i] = positions[i] + forces[i]*(delta/norm);
        minus[i] = positions[i] - forces[i]*(delta/norm);
    }
    context.setPositions(plus);
    double ePlus = context.getState(State::Energy).getPotentialEnergy();
    context.setPositions(minus);
    double eMinus = context.getState(State::Energy).getPotentialEnergy();
    context.setPositions(positions);
    // Moving along F/|F| by delta lowers the energy by |F| delta to first order.
    ASSERT_EQUAL_TOL(norm, (eMinus-ePlus)/(2*delta), relTolerance);
}

static void testHarmonic() {
    const int n = 10;
    const double k = 2.5;
    System system = makeSystem(n);
    system.addForce(forceFromBytes(BackmapTest::harmonicModule(k)));
    VerletIntegrator integrator(0.001);
    Context context(system, integrator, *platform);
    vector<Vec3> positions = randomPositions(n, 1);
    context.setPositions(positions);
    State state = context.getState(State::Energy | State::Forces);
    double expected = 0.0;
    for (int i = 0; i < n; i++) {
        expected += k*positions[i].dot(positions[i]);
        ASSERT_EQUAL_VEC(positions[i]*(-2*k), state.getForces()[i], tolerance);
    }
    ASSERT_EQUAL_TOL(expected, state.getPotentialEnergy(), tolerance);
    checkFiniteDifferences(context, positions, 1e-6);
}

static void testGlobalParameter() {
    const int n = 7;
    System system = makeSystem(n);
    BackmapTorchForce* force = forceFromBytes(BackmapTest::harmonicParameterModule());
    force->addGlobalParameter("k", 1.5);
    force->addEnergyParameterDerivative("k");
    system.addForce(force);
    VerletIntegrator integrator(0.001);
    Context context(system, integrator, *platform);
    vector<Vec3> positions = randomPositions(n, 2);
    context.setPositions(positions);
    double sum2 = 0.0;
    for (const Vec3& r : positions)
        sum2 += r.dot(r);
    for (double k : {1.5, 3.0}) {
        if (k != 1.5)
            context.setParameter("k", k);
        State state = context.getState(State::Energy | State::Forces | State::ParameterDerivatives);
        ASSERT_EQUAL_TOL(k*sum2, state.getPotentialEnergy(), tolerance);
        for (int i = 0; i < n; i++)
            ASSERT_EQUAL_VEC(positions[i]*(-2*k), state.getForces()[i], tolerance);
        map<string, double> derivatives = state.getEnergyParameterDerivatives();
        ASSERT(derivatives.find("k") != derivatives.end());
        ASSERT_EQUAL_TOL(sum2, derivatives["k"], tolerance);
    }
    // dE/dk by finite differences too.
    const double h = 1e-5;
    context.setParameter("k", 3.0+h);
    double ePlus = context.getState(State::Energy).getPotentialEnergy();
    context.setParameter("k", 3.0-h);
    double eMinus = context.getState(State::Energy).getPotentialEnergy();
    ASSERT_EQUAL_TOL(sum2, (ePlus-eMinus)/(2*h), 1e-7);
}

static void testPeriodic() {
    const int n = 5;
    System system = makeSystem(n);
    Vec3 a(2.0, 0, 0), b(0.3, 2.5, 0), c(-0.2, 0.4, 3.0);
    system.setDefaultPeriodicBoxVectors(a, b, c);
    BackmapTorchForce* force = forceFromBytes(BackmapTest::periodicModule());
    force->setUsesPeriodicBoundaryConditions(true);
    ASSERT(force->usesPeriodicBoundaryConditions());
    system.addForce(force);
    VerletIntegrator integrator(0.001);
    Context context(system, integrator, *platform);
    vector<Vec3> positions = randomPositions(n, 3);
    context.setPositions(positions);
    State state = context.getState(State::Energy | State::Forces | State::Positions);
    // Platforms may wrap positions into the box for periodic forces: use the ones they report.
    double expected = 2.0 + 2.5 + 3.0;
    for (int i = 0; i < n; i++) {
        Vec3 r = state.getPositions()[i];
        expected += r.dot(r);
        ASSERT_EQUAL_VEC(r*(-2.0), state.getForces()[i], tolerance);
    }
    ASSERT_EQUAL_TOL(expected, state.getPotentialEnergy(), tolerance);
}

static void testFloat32() {
    const int n = 6;
    System system = makeSystem(n);
    system.addForce(forceFromBytes(BackmapTest::float32Module(0.75f)));
    VerletIntegrator integrator(0.001);
    Context context(system, integrator, *platform);
    vector<Vec3> positions = randomPositions(n, 4);
    context.setPositions(positions);
    State state = context.getState(State::Energy | State::Forces);
    double expected = 0.0;
    for (int i = 0; i < n; i++) {
        expected += 0.75*positions[i].dot(positions[i]);
        ASSERT_EQUAL_VEC(positions[i]*(-1.5), state.getForces()[i], 1e-5);
    }
    ASSERT_EQUAL_TOL(expected, state.getPotentialEnergy(), 1e-5);
}

static void testNonlinearFiniteDifferences() {
    const int n = 8;
    System system = makeSystem(n);
    system.addForce(forceFromBytes(BackmapTest::pairModule()));
    VerletIntegrator integrator(0.001);
    Context context(system, integrator, *platform);
    vector<Vec3> positions = randomPositions(n, 5);
    context.setPositions(positions);
    // Direct evaluation of the same formula.
    double expected = 0.0;
    for (int i = 0; i < n; i++) {
        expected += tanh(positions[i][0]);
        for (int j = i+1; j < n; j++) {
            Vec3 d = positions[i]-positions[j];
            double r = sqrt(d.dot(d));
            expected += exp(-r*r/0.09) + 0.1*(r-0.5)*(r-0.5);
        }
    }
    ASSERT_EQUAL_TOL(expected, context.getState(State::Energy).getPotentialEnergy(), tolerance);
    checkFiniteDifferences(context, positions, 1e-6);
}

static void testForceGroupAndFile() {
    const int n = 4;
    string path = "backmap_test_module_" + platform->getName() + ".pt";
    {
        ofstream out(path, ios::binary);
        string bytes = BackmapTest::harmonicModule(1.0);
        out.write(bytes.data(), bytes.size());
    }
    System system = makeSystem(n);
    BackmapTorchForce* force = new BackmapTorchForce(path);
    remove(path.c_str());
    ASSERT_EQUAL(path, force->getFile());
    ASSERT(force->getModuleBytes() == BackmapTest::harmonicModule(1.0));
    force->setForceGroup(3);
    system.addForce(force);
    VerletIntegrator integrator(0.001);
    Context context(system, integrator, *platform);
    vector<Vec3> positions = randomPositions(n, 6);
    context.setPositions(positions);
    ASSERT_EQUAL_TOL(0.0, context.getState(State::Energy, false, 1<<0).getPotentialEnergy(), 0.0);
    ASSERT(context.getState(State::Energy, false, 1<<3).getPotentialEnergy() > 0.0);
}

static void expectContextError(BackmapTorchForce* force, int n, const string& fragment) {
    System system = makeSystem(n);
    system.addForce(force);
    VerletIntegrator integrator(0.001);
    bool thrown = false;
    try {
        Context context(system, integrator, *platform);
        context.setPositions(randomPositions(n, 7));
        context.getState(State::Energy);
    }
    catch (const OpenMMException& e) {
        thrown = true;
        if (string(e.what()).find(fragment) == string::npos)
            throw OpenMMException("expected an error containing '" + fragment + "', got: " + e.what());
    }
    if (!thrown)
        throw OpenMMException("expected an error containing '" + fragment + "'");
}

static void testErrors() {
    bool thrown = false;
    try {
        BackmapTorchForce force("/nonexistent/model.pt");
    }
    catch (const OpenMMException& e) {
        thrown = true;
    }
    ASSERT(thrown);
    expectContextError(forceFromBytes("this is not a zip archive"), 3, "not a loadable TorchScript module");
    string good = BackmapTest::harmonicModule(1.0);
    expectContextError(forceFromBytes(good.substr(0, good.size()/2)), 3, "not a loadable TorchScript module");
    BackmapTorchForce* extraParameter = forceFromBytes(good);
    extraParameter->addGlobalParameter("k", 1.0);
    expectContextError(extraParameter, 3, "forward() takes 1 argument(s) but the force passes 2");
    BackmapTorchForce* badDerivative = forceFromBytes(BackmapTest::harmonicParameterModule());
    badDerivative->addGlobalParameter("k", 1.0);
    badDerivative->addEnergyParameterDerivative("q");
    expectContextError(badDerivative, 3, "not a global parameter");
    expectContextError(forceFromBytes(BackmapTest::vectorOutputModule()), 3, "one energy value");
}

int main(int argc, char* argv[]) {
    if (argc < 3) {
        cerr << "usage: " << argv[0] << " <platform> <OpenMM plugin directory>" << endl;
        return 2;
    }
    try {
        Platform::loadPluginsFromDirectory(argv[2]);
        registerBackmapReferenceKernelFactories();
#ifdef BACKMAP_TEST_CUDA
        registerBackmapCudaKernelFactories();
#endif
        platform = &Platform::getPlatformByName(argv[1]);
        if (platform->getName() == "CUDA")
            tolerance = 1e-5;
        testHarmonic();
        testGlobalParameter();
        testPeriodic();
        testFloat32();
        testNonlinearFiniteDifferences();
        testForceGroupAndFile();
        testErrors();
    }
    catch (const exception& e) {
        cout << "exception: " << e.what() << endl;
        return 1;
    }
    cout << "Done (" << argv[1] << ")" << endl;
    return 0;
}
