#include "CudaBackmapKernels.h"
#include "internal/BackmapTorchUtilities.h"
#include "openmm/OpenMMException.h"
#include "openmm/common/ContextSelector.h"
#include "openmm/internal/ContextImpl.h"
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/autograd/autograd.h>
#include <algorithm>
#include <map>

using namespace BackmapPlugin;
using namespace OpenMM;
using namespace std;

// Device code, compiled at runtime by CudaContext::createModule, which defines real/real4 for the
// context's precision.  POS_T is the module's dtype.  Forces use OpenMM's fixed-point format
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

extern "C" __global__ void addForces(const POS_T* __restrict__ grad, unsigned long long* __restrict__ forceBuffer,
        const int* __restrict__ atomIndex, int numAtoms, int paddedNumAtoms) {
    for (int i = blockIdx.x*blockDim.x+threadIdx.x; i < numAtoms; i += blockDim.x*gridDim.x) {
        int atom = atomIndex[i];
        for (int k = 0; k < 3; k++) {
            double f = -(double) grad[3*atom+k];
            atomicAdd(&forceBuffer[i+k*paddedNumAtoms], (unsigned long long) ((long long) (f*0x100000000)));
        }
    }
}
)";

void CudaCalcBackmapTorchForceKernel::initialize(const System& system, const BackmapTorchForce& force, torch::jit::script::Module& module,
                                                 shared_ptr<BackmapCompiledModel> compiled) {
    if (compiled)
        throw OpenMMException("BackmapTorchForce: compiled force packages (.pt2) are built for the CPU and run on the "
                              "Reference and CPU platforms; give the CUDA platform the TorchScript model");
    ContextSelector selector(cu);
    device = torch::Device(torch::kCUDA, cu.getDeviceIndex());
    this->module = module;
    this->module.to(device);
    dtype = backmapModuleDtype(this->module);
    if (dtype != torch::kFloat32 && dtype != torch::kFloat64)
        throw OpenMMException("BackmapTorchForce: the CUDA kernel supports float32 and float64 modules only");
    periodic = force.usesPeriodicBoundaryConditions();
    for (int i = 0; i < force.getNumGlobalParameters(); i++) {
        const string& name = force.getGlobalParameterName(i);
        bool derivative = false;
        for (int j = 0; j < force.getNumEnergyParameterDerivatives(); j++)
            derivative |= (force.getEnergyParameterDerivativeName(j) == name);
        globalNames.push_back(name);
        globalNeedsDerivative.push_back(derivative);
        if (derivative)
            cu.addEnergyParameterDerivative(name);
    }
    positionBuffer = torch::empty({(long) system.getNumParticles(), 3}, torch::TensorOptions().dtype(dtype).device(device));
    map<string, string> defines;
    defines["POS_T"] = (dtype == torch::kFloat64 ? "double" : "float");
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
    bool anyDerivative = any_of(globalNeedsDerivative.begin(), globalNeedsDerivative.end(), [](bool b) { return b; });
    torch::AutoGradMode gradMode(includeForces || anyDerivative);

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

    // A new leaf sharing the buffer's memory: no copy, and the previous step's graph is gone.
    torch::Tensor positions = positionBuffer.detach();
    if (includeForces)
        positions.requires_grad_(true);
    inputs.clear();
    inputs.push_back(positions);
    torch::TensorOptions options = torch::TensorOptions().dtype(dtype).device(device);
    if (periodic) {
        Vec3 box[3];
        cu.getPeriodicBoxVectors(box[0], box[1], box[2]);
        inputs.push_back(torch::from_blob(box, {3, 3}, torch::kFloat64).to(options, false, true));
    }
    vector<torch::Tensor> gradTargets;
    vector<string> derivativeNames;
    if (includeForces)
        gradTargets.push_back(positions);
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

    if (!gradTargets.empty() && energy.requires_grad()) {
        vector<torch::Tensor> grads = torch::autograd::grad({energy}, gradTargets, {}, false, false, true);
        size_t next = 0;
        if (includeForces) {
            torch::Tensor g = grads[next++];
            if (g.defined()) {
                g = g.to(dtype).contiguous();
                void* gradPtr = g.data_ptr();
                void* addArgs[] = {&gradPtr, &cu.getForce().getDevicePointer(), &cu.getAtomIndexArray().getDevicePointer(), &numAtoms, &paddedNumAtoms};
                cu.executeKernel(addForcesKernel, addArgs, numAtoms);
            }
        }
        map<string, double>& derivatives = cu.getEnergyParamDerivWorkspace();
        for (size_t i = 0; i < derivativeNames.size(); i++, next++)
            if (grads[next].defined())
                derivatives[derivativeNames[i]] += grads[next].item<double>();
    }
    inputs.clear();
    // Reading the energy synchronises the stream, so only do it when it is wanted.
    return includeEnergy ? energy.item<double>() : 0.0;
}
