#include "BackmapTorchForce.h"
#include "BackmapTorchForceProxy.h"
#include "openmm/serialization/SerializationProxy.h"
#include <typeinfo>

#if defined(WIN32)
    #include <windows.h>
    extern "C" OPENMM_EXPORT_BACKMAP void registerBackmapSerializationProxies();
    BOOL WINAPI DllMain(HANDLE hModule, DWORD ul_reason_for_call, LPVOID lpReserved) {
        if (ul_reason_for_call == DLL_PROCESS_ATTACH)
            registerBackmapSerializationProxies();
        return TRUE;
    }
#else
    extern "C" void __attribute__((constructor)) registerBackmapSerializationProxies();
#endif

using namespace BackmapPlugin;
using namespace OpenMM;

extern "C" OPENMM_EXPORT_BACKMAP void registerBackmapSerializationProxies() {
    SerializationProxy::registerProxy(typeid(BackmapTorchForce), new BackmapTorchForceProxy());
}
