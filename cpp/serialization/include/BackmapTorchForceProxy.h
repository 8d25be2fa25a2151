#ifndef BACKMAP_TORCH_FORCE_PROXY_H_
#define BACKMAP_TORCH_FORCE_PROXY_H_

#include "internal/windowsExportBackmap.h"
#include "openmm/serialization/SerializationProxy.h"
#include <string>

namespace BackmapPlugin {

/**
 * XML serialization of a BackmapTorchForce.  The module bytes are embedded base64-encoded, so the
 * XML alone recreates the force.  Version 2 (module bytes with their length and CRC-32); version-1
 * XML (no checksum) is still read, newer versions are refused.
 */
class OPENMM_EXPORT_BACKMAP BackmapTorchForceProxy : public OpenMM::SerializationProxy {
public:
    BackmapTorchForceProxy();
    void serialize(const void* object, OpenMM::SerializationNode& node) const;
    void* deserialize(const OpenMM::SerializationNode& node) const;
    /** Encode bytes as base64 (RFC 4648, with padding). */
    static std::string encodeBase64(const std::string& bytes);
    /** Decode base64 text; throws OpenMMException on a malformed string. */
    static std::string decodeBase64(const std::string& text);
    /** CRC-32 of bytes as zlib.crc32 computes it (ISO 3309 polynomial). */
    static unsigned int crc32(const std::string& bytes);
};

} // namespace BackmapPlugin

#endif
