#ifndef REFERENCE_BACKMAP_KERNEL_FACTORY_H_
#define REFERENCE_BACKMAP_KERNEL_FACTORY_H_

#include "openmm/KernelFactory.h"
#include "internal/windowsExportBackmap.h"

namespace BackmapPlugin {

/**
 * Creates the plugin's kernels for the Reference platform and for platforms derived from it (CPU).
 */
class ReferenceBackmapKernelFactory : public OpenMM::KernelFactory {
public:
    OpenMM::KernelImpl* createKernelImpl(std::string name, const OpenMM::Platform& platform, OpenMM::ContextImpl& context) const;
};

} // namespace BackmapPlugin

/**
 * Register the factory with every loaded platform derived from ReferencePlatform (Reference, CPU)
 * that does not already provide the kernel.  Safe to call more than once.
 */
extern "C" OPENMM_EXPORT_BACKMAP void registerBackmapReferenceKernelFactories();

#endif
