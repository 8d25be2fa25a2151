#include "BackmapTorchForceProxy.h"
#include "BackmapTorchForce.h"
#include "openmm/OpenMMException.h"
#include "openmm/serialization/SerializationNode.h"
#include <cstdio>
#include <sstream>

using namespace BackmapPlugin;
using namespace OpenMM;
using namespace std;

// Version 1: module bytes (base64) and their length.  Version 2 adds their CRC-32, checked on
// reading: torch does not check the checksums of the entries of a TorchScript archive, so without it
// a damaged byte in the embedded weights would load as a silently different model.
static const int PROXY_VERSION = 2;
static const char BASE64_ALPHABET[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

BackmapTorchForceProxy::BackmapTorchForceProxy() : SerializationProxy("BackmapTorchForce") {
}

string BackmapTorchForceProxy::encodeBase64(const string& bytes) {
    string out;
    out.reserve(4*((bytes.size()+2)/3));
    size_t i = 0;
    for (; i+2 < bytes.size(); i += 3) {
        unsigned int v = ((unsigned char) bytes[i] << 16) | ((unsigned char) bytes[i+1] << 8) | (unsigned char) bytes[i+2];
        out += BASE64_ALPHABET[(v >> 18) & 63];
        out += BASE64_ALPHABET[(v >> 12) & 63];
        out += BASE64_ALPHABET[(v >> 6) & 63];
        out += BASE64_ALPHABET[v & 63];
    }
    size_t rest = bytes.size() - i;
    if (rest > 0) {
        unsigned int v = (unsigned char) bytes[i] << 16;
        if (rest == 2)
            v |= (unsigned char) bytes[i+1] << 8;
        out += BASE64_ALPHABET[(v >> 18) & 63];
        out += BASE64_ALPHABET[(v >> 12) & 63];
        out += (rest == 2 ? BASE64_ALPHABET[(v >> 6) & 63] : '=');
        out += '=';
    }
    return out;
}

unsigned int BackmapTorchForceProxy::crc32(const string& bytes) {
    // CRC-32 of ISO 3309 / zlib (reflected polynomial 0xEDB88320), bit by bit: modules are read once.
    unsigned int crc = 0xFFFFFFFFu;
    for (char c : bytes) {
        crc ^= (unsigned char) c;
        for (int k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
    }
    return crc ^ 0xFFFFFFFFu;
}

static string hex8(unsigned int value) {
    char text[9];
    snprintf(text, sizeof(text), "%08x", value);
    return text;
}

string BackmapTorchForceProxy::decodeBase64(const string& text) {
    int table[256];
    for (int& t : table)
        t = -1;
    for (int k = 0; k < 64; k++)
        table[(unsigned char) BASE64_ALPHABET[k]] = k;
    string out;
    out.reserve(3*text.size()/4);
    unsigned int buffer = 0;
    int bits = 0, padding = 0;
    for (char c : text) {
        if (c == '=') {
            padding++;
            continue;
        }
        if (c == '\n' || c == '\r' || c == ' ' || c == '\t')
            continue;
        int v = table[(unsigned char) c];
        if (v < 0 || padding > 0)
            throw OpenMMException("BackmapTorchForce: the embedded module is not valid base64");
        buffer = (buffer << 6) | v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out += (char) ((buffer >> bits) & 0xFF);
        }
    }
    if (padding > 2 || bits >= 6)
        throw OpenMMException("BackmapTorchForce: the embedded module is not valid base64");
    return out;
}

void BackmapTorchForceProxy::serialize(const void* object, SerializationNode& node) const {
    node.setIntProperty("version", PROXY_VERSION);
    const BackmapTorchForce& force = *reinterpret_cast<const BackmapTorchForce*>(object);
    node.setIntProperty("forceGroup", force.getForceGroup());
    node.setStringProperty("name", force.getName());
    node.setBoolProperty("usesPeriodic", force.usesPeriodicBoundaryConditions());
    node.setStringProperty("file", force.getFile());
    node.setIntProperty("moduleSize", force.getModuleBytes().size());
    node.setStringProperty("moduleCrc32", hex8(crc32(force.getModuleBytes())));
    node.setStringProperty("module", encodeBase64(force.getModuleBytes()));
    SerializationNode& globals = node.createChildNode("GlobalParameters");
    for (int i = 0; i < force.getNumGlobalParameters(); i++)
        globals.createChildNode("Parameter").setStringProperty("name", force.getGlobalParameterName(i))
                .setDoubleProperty("default", force.getGlobalParameterDefaultValue(i));
    SerializationNode& derivatives = node.createChildNode("EnergyParameterDerivatives");
    for (int i = 0; i < force.getNumEnergyParameterDerivatives(); i++)
        derivatives.createChildNode("Parameter").setStringProperty("name", force.getEnergyParameterDerivativeName(i));
}

void* BackmapTorchForceProxy::deserialize(const SerializationNode& node) const {
    // Every earlier version is read; only a newer one (written by a newer plugin) is refused.
    int version = node.getIntProperty("version");
    if (version > PROXY_VERSION)
        throw OpenMMException("Unsupported version number for BackmapTorchForce: " + to_string(version)
                + " (this plugin reads versions up to " + to_string(PROXY_VERSION) + "; update openmm-backmap)");
    BackmapTorchForce* force = new BackmapTorchForce();
    try {
        string bytes = decodeBase64(node.getStringProperty("module"));
        if ((int) bytes.size() != node.getIntProperty("moduleSize", bytes.size()))
            throw OpenMMException("BackmapTorchForce: the embedded module has the wrong length (truncated XML?)");
        if (version >= 2 && node.getStringProperty("moduleCrc32") != hex8(crc32(bytes)))
            throw OpenMMException("BackmapTorchForce: the embedded module does not match its CRC-32 checksum (damaged XML?)");
        force->setModuleBytes(bytes);
        force->setForceGroup(node.getIntProperty("forceGroup", 0));
        force->setName(node.getStringProperty("name", force->getName()));
        force->setUsesPeriodicBoundaryConditions(node.getBoolProperty("usesPeriodic", false));
        for (const SerializationNode& p : node.getChildNode("GlobalParameters").getChildren())
            force->addGlobalParameter(p.getStringProperty("name"), p.getDoubleProperty("default"));
        for (const SerializationNode& p : node.getChildNode("EnergyParameterDerivatives").getChildren())
            force->addEnergyParameterDerivative(p.getStringProperty("name"));
    }
    catch (...) {
        delete force;
        throw;
    }
    return force;
}
