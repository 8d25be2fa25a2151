#ifndef BACKMAP_COMPILED_MODEL_H_
#define BACKMAP_COMPILED_MODEL_H_

#include "internal/BackmapEnergyModel.h"
#include "internal/BackmapGlobalParameters.h"
#include <memory>
#include <string>
#include <vector>

namespace torch::inductor {
class AOTIModelPackageLoader;
}

namespace BackmapPlugin {

/**
 * A compiled force package (.pt2, AOTInductor) as a BackmapEnergyModel, loaded from its bytes,
 * with the openmm-backmap metadata written by openmm_backmap.openmm.compiled.compile_model:
 *
 *     run(positions[n, 3][, box[3, 3]][, p_1, ..., p_m]) -> (energy, forces[n, 3][, dE/dp_1, ...])
 *
 * all float64 on the CPU, nm and kJ/mol.  The package computes the forces and every dE/dp in the
 * same call, whether or not they are asked for.
 */
class OPENMM_EXPORT_BACKMAP BackmapCompiledModel : public BackmapEnergyModel {
public:
    static constexpr const char* FORMAT = "openmm-backmap-compiled-force";
    static constexpr const char* VERSION = "1";
    /**
     * Load a package from its bytes and read its metadata, and check that it fits the force (its
     * periodicity and global parameters) and the System (its number of particles).
     */
    BackmapCompiledModel(const std::string& bytes, const BackmapTorchForce& force, int numParticles);
    ~BackmapCompiledModel();
    c10::TensorOptions getInputOptions() const;
    /** Packages are built for the CPU: any other device is refused. */
    void moveTo(const c10::Device& device);
    BackmapEvaluation evaluate(const at::Tensor& positions, const at::Tensor& box, const std::vector<double>& parameters,
                               bool includeForces);
    /** The number of particles the package was built for. */
    int numParticles;
    /** Whether it takes box vectors. */
    bool periodic;
    /** The global parameters it takes, in order. */
    std::vector<std::string> globalParameters;
private:
    /** The names of a JSON list of strings without escapes, as json.dumps writes parameter names. */
    static std::vector<std::string> parseNames(const std::string& json);
    void check(const BackmapTorchForce& force, int numParticles) const;
    std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
    BackmapGlobalParameters parameters;
    std::vector<at::Tensor> inputs;
};

} // namespace BackmapPlugin

#endif /*BACKMAP_COMPILED_MODEL_H_*/
