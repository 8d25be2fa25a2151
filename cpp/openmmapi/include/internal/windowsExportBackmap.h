#ifndef BACKMAP_WINDOWS_EXPORT_H_
#define BACKMAP_WINDOWS_EXPORT_H_

/*
 * Symbol visibility for the plugin's shared libraries (Windows needs explicit exports; elsewhere
 * the default visibility is used).
 */
#if defined(_MSC_VER)
    #if defined(BACKMAP_BUILDING_SHARED_LIBRARY)
        #define OPENMM_EXPORT_BACKMAP __declspec(dllexport)
    #else
        #define OPENMM_EXPORT_BACKMAP __declspec(dllimport)
    #endif
#else
    #define OPENMM_EXPORT_BACKMAP __attribute__((visibility("default")))
#endif

#endif
