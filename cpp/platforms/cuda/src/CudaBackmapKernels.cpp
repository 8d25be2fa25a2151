#include "CudaBackmapKernels.h"
#include "openmm/OpenMMException.h"
#include "openmm/common/ContextSelector.h"
#include "openmm/internal/ContextImpl.h"
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <map>

using namespace BackmapPlugin;
using namespace OpenMM;
using namespace std;

// Device code, compiled at runtime by CudaContext::createModule, which defines real/real4 for the
// context's precision.  POS_T is the model's dtype.  Forces use OpenMM's fixed-point format
// (x block, y block, z block of paddedNumAtoms 64-bit integers, scaled by 2^32).
static const char* CUDA_BACKMAP_SOURCE = R"(
extern "C" __global__ void copyInputs(const real4* __restrict__ posq,
#ifdef USE_MIXED_PRECISION
        const real4* __restrict__ posqCorrection,
#endif
        const int* __restrict__ atomIndex, POS_T* __restrict__ out, int numAtoms) {
    for (int i = blockIdx.x*blockDim.x+threadIdx.x; i < numAtoms; i += blockDim.x*gridDim.x) {
        int atom = atomIndex[i];
        real4 p = posq[i];
#ifdef USE_MIXED_PRECISION
        real4 c = posqCorrection[i];
        out[3*atom] = (POS_T) ((double) p.x + (double) c.x);
        out[3*atom+1] = (POS_T) ((double) p.y + (double) c.y);
        out[3*atom+2] = (POS_T) ((double) p.z + (double) c.z);
#else
        out[3*atom] = (POS_T) p.x;
        out[3*atom+1] = (POS_T) p.y;
        out[3*atom+2] = (POS_T) p.z;
#endif
    }
}

extern "C" __global__ void addForces(const POS_T* __restrict__ forces, unsigned long long* __restrict__ forceBuffer,
        const int* __restrict__ atomIndex, int numAtoms, int paddedNumAtoms) {
    for (int i = blockIdx.x*blockDim.x+threadIdx.x; i < numAtoms; i += blockDim.x*gridDim.x) {
        int atom = atomIndex[i];
        for (int k = 0; k < 3; k++) {
            double f = (double) forces[3*atom+k];
            atomicAdd(&forceBuffer[i+k*paddedNumAtoms], (unsigned long long) ((long long) (f*0x100000000)));
        }
    }
}
)";

void CudaCalcBackmapTorchForceKernel::initialize(const System& system, const BackmapTorchForce& force, shared_ptr<BackmapEnergyModel> model) {
    ContextSelector selector(cu);
    this->model = model;
    // A compiled package refuses any device but the CPU here.
    model->moveTo(c10::Device(c10::kCUDA, cu.getDeviceIndex()));
    options = model->getInputOptions();
    dtype = options.dtype().toScalarType();
    if (dtype != at::kFloat && dtype != at::kDouble)
        throw OpenMMException("BackmapTorchForce: the CUDA kernel supports float32 and float64 modules only");
    periodic = force.usesPeriodicBoundaryConditions();
    parameters = BackmapGlobalParameters(force);
    for (int i = 0; i < parameters.size(); i++)
        if (parameters.needsDerivative(i))
            cu.addEnergyParameterDerivative(parameters.getName(i));
    positionBuffer = at::empty({(long) system.getNumParticles(), 3}, options);
    map<string, string> defines;
    defines["POS_T"] = (dtype == at::kDouble ? "double" : "float");
    if (cu.getUseMixedPrecision())
        defines["USE_MIXED_PRECISION"] = "1";
    CUmodule program = cu.createModule(CUDA_BACKMAP_SOURCE, defines);
    copyInputsKernel = cu.getKernel(program, "copyInputs");
    addForcesKernel = cu.getKernel(program, "addForces");
}

double CudaCalcBackmapTorchForceKernel::execute(ContextImpl& context, bool includeForces, bool includeEnergy) {
    ContextSelector selector(cu);
    // Queue torch's work on OpenMM's stream so it is ordered with OpenMM's kernels.
    c10::cuda::CUDAStream stream = c10::cuda::getStreamFromExternal(cu.getCurrentStream(), cu.getDeviceIndex());
    c10::cuda::CUDAStreamGuard streamGuard(stream);

    int numAtoms = cu.getNumAtoms();
    int paddedNumAtoms = cu.getPaddedNumAtoms();
    void* posOut = positionBuffer.data_ptr();
    vector<void*> copyArgs = {&cu.getPosq().getDevicePointer()};
    if (cu.getUseMixedPrecision())
        copyArgs.push_back(&cu.getPosqCorrection().getDevicePointer());
    copyArgs.push_back(&cu.getAtomIndexArray().getDevicePointer());
    copyArgs.push_back(&posOut);
    copyArgs.push_back(&numAtoms);
    cu.executeKernel(copyInputsKernel, copyArgs.data(), numAtoms);

    at::Tensor box;
    if (periodic) {
        Vec3 vectors[3];
        cu.getPeriodicBoxVectors(vectors[0], vectors[1], vectors[2]);
        box = at::from_blob(vectors, {3, 3}, at::kDouble).to(options, false, true);
    }
    // The position buffer is this kernel's own, so the model may use it as its autograd leaf.
    BackmapEvaluation result = model->evaluate(positionBuffer, box, parameters.getValues(context), includeForces);
    if (includeForces && result.forces.defined()) {
        at::Tensor f = result.forces.to(dtype).contiguous();
        void* forcePtr = f.data_ptr();
        void* addArgs[] = {&forcePtr, &cu.getForce().getDevicePointer(), &cu.getAtomIndexArray().getDevicePointer(), &numAtoms, &paddedNumAtoms};
        cu.executeKernel(addForcesKernel, addArgs, numAtoms);
    }
    parameters.addDerivatives(result.parameterDerivatives, cu.getEnergyParamDerivWorkspace());
    // Reading the energy synchronises the stream, so only do it when it is wanted.
    return includeEnergy ? result.energy.item<double>() : 0.0;
}
